"""A job's report step, run as ``python -m zoodip_edge.many finish SPEC_JSON`` once its
embedding is trained: the held-out loss, a grid image, and with ``--evaluate`` a score.

A process of its own, as personalize is: a worker never loads a model itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ..errors import UserError
from .records import write_json
from .worker import die_with_parent, error_line


def finish_job(spec: dict) -> dict:
    """Held-out loss of the learned token, a grid image (training photos over images made with
    the token), and with ``evaluate`` the concept score (toy world) or ``zoodip-edge evaluate``."""
    import numpy as np

    from ..demo import generate_with
    from ..embeddings import load_embedding
    from ..runtime.personalize import Personalizer, Settings
    from ..runtime.stopping import probe_set

    o = spec["options"]
    d = Path(spec["dir"])
    keys = ("n", "mu", "lr", "tau", "nu", "t_low", "t_high", "seed", "templates", "guide_vocab", "guide_encoder")
    settings = Settings(**{k: o[k] for k in keys if k in o}, subspace=not o.get("no_subspace", False),
                        puts=not o.get("no_puts", False), batch_perturbations=o.get("batched"))
    p = Personalizer(o["bundle"], o["images"], o["token"], o["init"], settings=settings, captions=o.get("captions"),
                     profile=str(d / "profile.toml"))
    _, theta, _ = load_embedding(spec["out"])
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    # The demo's held-out probes, spread over this run's PUTS range: the same for every job of a sweep.
    probes = probe_set(p.config.t_low, p.config.t_high, 16, 1000)
    result: dict[str, Any] = {"held_out_loss": p.held_out_loss(theta, probes),
                              "held_out_loss_init": p.held_out_loss(p.theta0, probes)}
    images = generate_with(p, theta, spec["images"], seed=0)
    _save_grid(d / "grid.png", o["images"], p.bundle.manifest["resolution"], o["token"], images)
    result["grid"] = str(d / "grid.png")
    if spec.get("evaluate"):
        result.update(_evaluate(spec, images))
    write_json(d / "result.json", result)
    return result


def _save_grid(path: Path, photos: str, resolution: int, token: str, images: list) -> None:
    """Two labelled rows: the training photos, then the images made with the token."""
    import numpy as np
    from PIL import Image, ImageDraw

    from ..runtime.images import load_images

    reference = [Image.fromarray(((im.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8))
                 for _, im in load_images(photos, resolution)]
    side = max(96, images[0].width)
    cols = max(len(images), len(reference))
    grid = Image.new("RGB", (70 + cols * (side + 2), 2 * (side + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, row) in enumerate((("photos", reference), (token, images))):
        draw.text((4, r * (side + 2) + side // 2 - 5), label[:10], fill="black")
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (70 + c * (side + 2), r * (side + 2)))
    grid.save(path)


def _evaluate(spec: dict, images: list) -> dict:
    o = spec["options"]
    if spec.get("concept"):
        from ..demo import parse_concept
        from ..toy import shipped_path, toy_model
        from ..toy.score import concept_score

        world = toy_model("toy-768").world if Path(o["bundle"]).resolve() == shipped_path("bundle-768").resolve() \
            else toy_model("toy-64").world
        color, shape = parse_concept(spec["concept"], world)
        return {f"concept_{k}": v for k, v in concept_score(images, color, shape, world).items()}
    if spec.get("class_word"):
        folder = Path(spec["dir"]) / "evaluate"
        cmd = [sys.executable, "-m", "zoodip_edge.cli", "evaluate", "--all", "--references", o["images"],
               "--class-word", spec["class_word"], "--token", o["token"], "--out", str(folder),
               "--bundle", o["bundle"], "--embedding", spec["out"], "--device", str(Path(spec["dir"]) / "profile.toml"),
               "--force"]
        r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent)
        if r.returncode != 0:
            raise UserError(f"zoodip-edge evaluate: {error_line(r.stderr)}")
        res = json.loads((folder / "results.json").read_text())
        return {k: res[k] for k in ("clip_i", "clip_t", "dino") if k in res}
    return {}


def main(argv: list[str]) -> int:
    """``finish SPEC_JSON``: the report step of one job; exit status 2 with one line on a refusal."""
    if len(argv) != 2 or argv[0] != "finish":
        print("usage: python -m zoodip_edge.many finish SPEC_JSON (used by personalize-many)", file=sys.stderr)
        return 2
    try:
        finish_job(json.loads(argv[1]))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
