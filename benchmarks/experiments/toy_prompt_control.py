"""Does a shipped toy model follow its prompts? Every named color x shape, and what generic words draw.

    python -m benchmarks.experiments.toy_prompt_control [--model toy-768] [--images 8] [--guidance 4] [--sheet out.png]

Generates "a photo of a {color} {shape}" for every pair the captions can name (orange cross was
never in the training data) and prints a markdown table of concept scores. Then the generic
prompts ("a photo of a shape", "a photo of a red shape", "a photo of a circle"): what they draw,
read from pixels. In the toy-768 world they should draw any shape or color, the unnamed ones no
more often than the named (their share is printed beside its fair value).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.common import header
from zoodip_edge.runtime.generate import Generator
from zoodip_edge.toy import TOY_MODELS, shipped_path, toy_model
from zoodip_edge.toy.score import concept_score, read_image
from zoodip_edge.toy.world import GENERIC, HELD_OUT

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="toy-64", choices=sorted(TOY_MODELS))
ap.add_argument("--images", type=int, default=8)
ap.add_argument("--generic-images", type=int, default=32)
ap.add_argument("--guidance", type=float, default=4.0)
ap.add_argument("--sheet", type=Path)
a = ap.parse_args()
toy = toy_model(a.model)
world = toy.world
g = Generator(shipped_path(toy.bundle), profile="cpu")
shapes = [s for s in world.shapes if world.named(s)]
colors = [c for c in world.colors if world.named(c)]
rows, scores = [], {}
for c in colors:
    for s in shapes:
        ims = g.generate(f"a photo of a {c} {s}", n=a.images, steps=20, guidance=a.guidance, seed=1)
        scores[c, s] = concept_score(ims, c, s, world)
        rows.append(np.concatenate([np.asarray(i) for i in ims], 1))
print(header(sys.argv))
print(f"{a.model}: {a.images} images per prompt, DDIM 20 steps, guidance {a.guidance}, seed 1\n")
print("| prompt color \\ shape | " + " | ".join(shapes) + " |")
print("|---|" + "---|" * len(shapes))
for c in colors:
    cells = [f"{scores[c, s]['color']:.2f} / {scores[c, s]['shape']:.2f}" + (" (held out)" if (c, s) == HELD_OUT else "")
             for s in shapes]
    print(f"| {c} | " + " | ".join(cells) + " |")
allc = [v["color"] for v in scores.values()]
alls = [v["shape"] for v in scores.values()]
print(f"\nColor right {np.mean(allc):.3f}, shape right {np.mean(alls):.3f} (cells: color / shape accuracy).\n")

print(f"Generic prompts, {a.generic_images} images each (fair share: 1 / the number of choices):\n")
print("| prompt | what it drew (read from pixels) | unnamed share | fair share |")
print("|---|---|---|---|")
for prompt, attribute, choices in ((f"a photo of a {GENERIC}", "shape", world.shapes),
                                   (f"a photo of a red {GENERIC}", "shape", world.shapes),
                                   ("a photo of a circle", "color", world.colors),
                                   (f"a photo of a {GENERIC}", "color", world.colors)):
    readings = [read_image(im, world=world) for im in g.generate(prompt, n=a.generic_images, steps=20,
                                                                  guidance=a.guidance, seed=2)]
    drawn = Counter(getattr(r, attribute) for r in readings)
    unnamed = [x for x in choices if not world.named(x)]
    share = sum(drawn[x] for x in unnamed) / len(readings)
    fair = len(unnamed) / len(choices)
    shown = ", ".join(f"{k} {v}" for k, v in drawn.most_common())
    print(f"| \"{prompt}\" ({attribute}) | {shown} | {share:.2f} | {fair:.2f} |")
if a.sheet:
    Image.fromarray(np.concatenate(rows, 0)).save(a.sheet)
