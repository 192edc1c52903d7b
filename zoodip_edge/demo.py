"""``zoodip-edge demo``: the whole chain on an embedded default, offline, in about a minute.

Builds a tiny SD1-architecture pipeline (random weights), exports it to an int8-cpu bundle,
draws four reference photos of a red ball, personalizes a token with ZOODiP, and reports the
held-out diffusion loss before and after against a random move of the same size. With random
weights this shows the optimizer working through the real export and runtime, not a concept
being learned: that needs the trained toy model (a later issue).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

PROBES = [(int(t), 1000 + i) for i, t in enumerate(np.linspace(500, 899, 12))]


def draw_photos(folder: Path, count: int = 4) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        im = Image.new("RGB", (96, 80), (250, 250, 245))
        ImageDraw.Draw(im).ellipse((12 + 4 * i, 8, 70 + 4 * i, 66), fill=(220, 30, 30))
        im.save(folder / f"ball{i}.png")
    return folder


def run_demo(out: Path, steps: int = 300, seed: int = 0, say: Callable[[str], None] = lambda s: None) -> dict:
    from .export import export_bundle
    from .export.tiny import build_tiny_pipeline
    from .runtime.personalize import Personalizer, Settings

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pipeline = out / "tiny-sd1"
    if not (pipeline / "model_index.json").exists():
        say("building a tiny SD1-architecture pipeline (random weights)")
        build_tiny_pipeline(pipeline, "sd1", seed=seed)
    bundle = out / "bundle"
    if not (bundle / "manifest.json").exists():
        export_bundle(str(pipeline), bundle, recipe="int8-cpu", force=True, progress=say)
    photos = draw_photos(out / "photos")
    say(f"personalizing <red-ball> for {steps} steps")
    p = Personalizer(bundle, photos, "<red-ball>", "dog", settings=Settings(seed=seed), profile="cpu")
    before = p.held_out_loss(p.theta0, PROBES)
    for _ in p.run(steps):
        pass
    after = p.held_out_loss(p.theta, PROBES)
    moved = p.theta - p.theta0
    rng = np.random.default_rng(seed)
    random_changes = []
    for _ in range(4):
        u = rng.standard_normal(moved.size)
        u *= np.linalg.norm(moved) / np.linalg.norm(u)
        random_changes.append((p.held_out_loss(p.theta0 + u, PROBES) - before) / before)
    p.save(out / "learned_embeds.safetensors")
    return {"before": before, "after": after, "change": (after - before) / before,
            "random_change": float(np.max(np.abs(random_changes))), "steps": steps,
            "embedding": str(out / "learned_embeds.safetensors")}
