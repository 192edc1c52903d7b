"""A concept score from pixels alone: which color and which shape an image shows.

The model never sees this measurement: the background is the median border color, the object
is every pixel far from it, its color is the nearest world color to the object's mean, and its
shape is the template (drawn into the object's bounding box) with the highest IoU.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .world import ALL_COLORS, TOY64, World, draw_shape

MIN_PIXELS = 12  # fewer object pixels than this: nothing recognisable was drawn


@dataclass(frozen=True)
class Reading:
    color: str | None
    shape: str | None


def read_image(image: np.ndarray | Image.Image, threshold: float = 60.0, world: World = TOY64) -> Reading:
    """The color and shape ``image`` shows, among those ``world`` draws."""
    a = np.asarray(image, dtype=np.float64)[..., :3]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    bg = np.median(border, axis=0)
    mask = np.linalg.norm(a - bg, axis=-1) > threshold
    if mask.sum() < MIN_PIXELS:
        return Reading(None, None)
    mean = a[mask].mean(axis=0)
    names = list(world.colors)
    color = names[int(np.argmin([np.linalg.norm(mean - np.array(ALL_COLORS[c])) for c in names]))]
    ys, xs = np.nonzero(mask)
    box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    best, best_iou = None, -1.0
    for shape in world.shapes:
        t = Image.new("L", (a.shape[1], a.shape[0]), 0)
        draw_shape(ImageDraw.Draw(t), shape, box, 1, 0)
        tm = np.asarray(t, dtype=bool)
        iou = (tm & mask).sum() / max((tm | mask).sum(), 1)
        if iou > best_iou:
            best, best_iou = shape, iou
    return Reading(color, best)


def concept_score(images, color: str, shape: str, world: World = TOY64) -> dict[str, float]:
    """Mean over images of (color right + shape right) / 2, with each part on its own."""
    readings = [read_image(im, world=world) for im in images]
    c = float(np.mean([r.color == color for r in readings]))
    s = float(np.mean([r.shape == shape for r in readings]))
    return {"score": (c + s) / 2, "color": c, "shape": s}
