"""``zoodip-edge demo``: personalization seen to work, offline, on the device install alone.

On the shipped toy bundle (a small SD-architecture model trained on the toy world,
``zoodip_edge/toy``): render five reference photos of a concept (a color x shape pair, e.g. a
purple ring), generate "a photo of a <token>" with the token at its initializer ("shape"),
learn the token with ZOODiP, generate again, and score both sets from pixels alone
(``toy.score``: which color and shape each image shows). Writes grid.png (reference | before |
after), loss.png, the embedding, and returns the figures.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from .errors import UserError
from .files import refuse_existing
from .runtime.stopping import probe_set
from .toy.world import GENERIC, TOY64, World

DEFAULT_CONCEPT = "purple-ring"
# Hyperparameters (lr, mu, tau, steps) come from the toy bundle's manifest, which records the
# ones that suit its model (docs/toy.md): the 64-d toy wants a larger step than SD1's defaults.
PROBES = probe_set(500, 900, 16, 1000)  # the held-out (t, noise seed) probes the demo and benchmarks read


def parse_concept(concept: str, world: World = TOY64) -> tuple[str, str]:
    color, _, shape = concept.partition("-")
    if color not in world.colors or shape not in world.shapes:
        raise UserError(f"concept {concept!r} is not color-shape with a color of {', '.join(world.colors)} "
                        f"and a shape of {', '.join(world.shapes)} ({world.name})")
    return color, shape


def generate_with(p, theta: np.ndarray, n: int, seed: int, steps: int = 20, guidance: float = 4.0) -> list[Image.Image]:
    """``n`` images of "a photo of a <token>" with the token set to ``theta`` (sessions shared with ``p``)."""
    from .runtime.generate import Generator

    g = Generator(p.bundle, profile=p.profile, sessions=p.sessions, extra_tokens=[(p.token, theta[None])])
    return g.generate(f"a photo of a {p.token}", n=n, steps=steps, guidance=guidance, seed=seed)


#: What a demo writes in its folder; a rerun replaces them only when forced.
OUTPUTS = ("learned_embeds.safetensors", "grid.png", "loss.png", "photos")


def check_out(out: Path, force: bool) -> None:
    """Refuse, before any work, a folder that is a file or (without ``force``) holds a demo's outputs."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is not a folder")
    if not force:
        refuse_existing(out / name for name in OUTPUTS)


def demo_steps(model: str) -> int:
    """The steps the toy bundle's manifest recommends for its model."""
    from .bundle import load_bundle
    from .toy import shipped_path, toy_model

    return int(load_bundle(shipped_path(toy_model(model).bundle), verify=False).manifest["defaults"]["steps"])


def run_demo(out: Path, steps: int | None = None, seed: int = 0, concept: str = DEFAULT_CONCEPT, images: int = 16,
             say: Callable[[str], None] = lambda s: None,
             progress: Callable[[int, int], None] | None = None, force: bool = False, model: str = "toy-64") -> dict:
    from .runtime.personalize import Personalizer, Settings
    from .toy import shipped_path, toy_model
    from .toy.score import concept_score
    from .toy.world import concept_photos

    toy = toy_model(model)
    color, shape = parse_concept(concept, toy.world)
    steps = steps if steps is not None else demo_steps(model)
    out = Path(out)
    check_out(out, force)
    out.mkdir(parents=True, exist_ok=True)
    photos = concept_photos(out / "photos", color, shape, count=5, seed=seed)
    token = f"<{color}-{shape}>"
    settings = Settings(seed=seed, batch_perturbations=True)  # tiny model: batching is cheap
    p = Personalizer(shipped_path(toy.bundle), photos, token, GENERIC, settings=settings, profile="cpu")
    say(f"generating {images} images of 'a photo of a {token}' with the token at its initializer '{GENERIC}'")
    before_images = generate_with(p, p.theta0, images, seed)
    say(f"personalizing {token} on {len(photos)} reference photos for {steps} ZOODiP steps")
    every = max(1, steps // 10)
    curve, held = [], [(0, p.held_out_loss(p.theta0, PROBES))]
    start = time.perf_counter()
    for record in p.run(steps):
        done = record.step + 1  # records count from 0
        curve.append(float(record.losses[0]))
        if done % every == 0 or done == steps:
            held.append((done, p.held_out_loss(p.theta, PROBES)))
        if progress:
            progress(done, steps)
    seconds = time.perf_counter() - start
    after_images = generate_with(p, p.theta, images, seed)
    words = toy.world.words(color, shape)  # for an unnamed attribute, the best the vocabulary can say
    words_loss = p.held_out_loss(None, PROBES, words=words)
    before = concept_score(before_images, color, shape, toy.world)
    after = concept_score(after_images, color, shape, toy.world)
    p.save(out / "learned_embeds.safetensors")
    save_grid(out / "grid.png", [Image.open(x) for x in photos], before_images, after_images)
    save_curve(out / "loss.png", curve, held, words_loss)
    gap = held[0][1] - words_loss
    return {"concept": f"{color} {shape}", "model": toy.name, "token": token, "steps": steps, "seconds": seconds,
            "score_before": before, "score_after": after, "loss_init": held[0][1], "loss_after": held[-1][1],
            "words": words, "loss_words": words_loss, "gap_closed": (held[0][1] - held[-1][1]) / gap if gap > 0 else float("nan"),
            "embedding": str(out / "learned_embeds.safetensors"), "grid": str(out / "grid.png"), "curve": str(out / "loss.png")}


def save_grid(path: Path, reference: list[Image.Image], before: list[Image.Image], after: list[Image.Image],
              scale: int = 3, cols: int = 8) -> None:
    """Three labelled rows of images (reference | before | after), pixels enlarged ``scale`` times."""
    rows = [("reference", reference[:cols]), ("before", before[:cols]), ("after", after[:cols])]
    side = reference[0].width * scale
    label_w, pad = 70, 2
    im = Image.new("RGB", (label_w + cols * (side + pad), len(rows) * (side + pad)), "white")
    d = ImageDraw.Draw(im)
    for r, (label, pics) in enumerate(rows):
        y = r * (side + pad)
        d.text((4, y + side // 2 - 5), label, fill="black")
        for c, pic in enumerate(pics):
            im.paste(pic.convert("RGB").resize((side, side), Image.NEAREST), (label_w + c * (side + pad), y))
    im.save(path)


def save_curve(path: Path, train: list[float], held: list[tuple[int, float]], words: float,
               size: tuple[int, int] = (640, 360)) -> None:
    """Training loss (moving average), held-out loss and the concept-in-words loss, drawn with Pillow."""
    w, h = size
    left, right, top, bottom = 60, 20, 30, 40
    window = max(1, len(train) // 30)
    smooth = np.convolve(train, np.ones(window) / window, mode="valid") if len(train) >= window else np.asarray(train)
    ys = np.concatenate([smooth, [v for _, v in held], [words]]) if len(smooth) else np.array([words])
    lo, hi = float(ys.min()), float(ys.max())
    hi = hi if hi > lo else lo + 1e-6
    n = max(len(train), 1)
    X = lambda s: left + (w - left - right) * s / n  # noqa: E731
    Y = lambda v: top + (h - top - bottom) * (hi - v) / (hi - lo)  # noqa: E731
    im = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(im)
    d.rectangle((left, top, w - right, h - bottom), outline="black")
    if len(smooth) > 1:
        d.line([(X(i + window), Y(v)) for i, v in enumerate(smooth)], fill=(120, 120, 220), width=1)
    d.line([(X(s), Y(v)) for s, v in held], fill=(200, 30, 30), width=2)
    for s, v in held:
        d.ellipse((X(s) - 3, Y(v) - 3, X(s) + 3, Y(v) + 3), fill=(200, 30, 30))
    d.line([(left, Y(words)), (w - right, Y(words))], fill=(30, 150, 30), width=1)
    d.text((left, 8), "blue: training loss (moving avg)   red: held-out loss   green: concept in words", fill="black")
    d.text((left, h - bottom + 6), f"step 0 .. {n}", fill="black")
    d.text((4, top), f"{hi:.3f}", fill="black")
    d.text((4, h - bottom - 10), f"{lo:.3f}", fill="black")
    im.save(path)


def draw_photos(folder: Path, count: int = 4) -> Path:
    """Photos of a red ball (ball0.png ...): inputs for tests and benchmarks on random-weight models."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        im = Image.new("RGB", (96, 80), (250, 250, 245))
        ImageDraw.Draw(im).ellipse((12 + 4 * i, 8, 70 + 4 * i, 66), fill=(220, 30, 30))
        im.save(folder / f"ball{i}.png")
    return folder
