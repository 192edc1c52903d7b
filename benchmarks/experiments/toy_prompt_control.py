"""Does the shipped toy model follow its prompts? Every color x shape, scored from pixels.

    python -m benchmarks.experiments.toy_prompt_control [--bundle B] [--images 8] [--guidance 4] [--sheet out.png]

Generates "a photo of a {color} {shape}" for all 30 pairs (orange cross was never in the
training data) and "a photo of a shape", and prints a markdown table of concept scores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import header
from zoodip_edge.runtime.generate import Generator
from zoodip_edge.toy import shipped_path
from zoodip_edge.toy.score import concept_score, read_image
from zoodip_edge.toy.world import COLORS, GENERIC, HELD_OUT, SHAPES

ap = argparse.ArgumentParser()
ap.add_argument("--bundle", default=str(shipped_path("bundle")))
ap.add_argument("--images", type=int, default=8)
ap.add_argument("--guidance", type=float, default=4.0)
ap.add_argument("--sheet", type=Path)
a = ap.parse_args()
g = Generator(a.bundle, profile="cpu")
rows, scores = [], {}
for c in COLORS:
    for s in SHAPES:
        ims = g.generate(f"a photo of a {c} {s}", n=a.images, steps=20, guidance=a.guidance, seed=1)
        scores[c, s] = concept_score(ims, c, s)
        rows.append(np.concatenate([np.asarray(i) for i in ims], 1))
generic = [read_image(im) for im in g.generate(f"a photo of a {GENERIC}", n=16, steps=20, guidance=a.guidance, seed=1)]
print(header(sys.argv))
print(f"{a.images} images per prompt, DDIM 20 steps, guidance {a.guidance}, seed 1\n")
print("| prompt color \\ shape | " + " | ".join(SHAPES) + " |")
print("|---|" + "---|" * len(SHAPES))
for c in COLORS:
    cells = [f"{scores[c, s]['color']:.2f} / {scores[c, s]['shape']:.2f}" + (" (held out)" if (c, s) == HELD_OUT else "") for s in SHAPES]
    print(f"| {c} | " + " | ".join(cells) + " |")
allc = [v["color"] for v in scores.values()]
alls = [v["shape"] for v in scores.values()]
print(f"\nColor right {np.mean(allc):.3f}, shape right {np.mean(alls):.3f} (cells: color / shape accuracy).")
print(f"'a photo of a {GENERIC}': " + ", ".join(f"{r.color} {r.shape}" for r in generic))
if a.sheet:
    Image.fromarray(np.concatenate(rows, 0)).save(a.sheet)
