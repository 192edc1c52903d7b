"""A procedural world of colored shapes, deterministic from a seed (NumPy + Pillow only).

Each scene is a shape kind, a color, a size, a position and a background; its caption names
the color, the shape and (sometimes) the background. A personalization *concept* is a color x
shape pair that the model's vocabulary describes with two words and a textual-inversion token
must capture in one; ``HELD_OUT`` never appears in the training data at all.

Two worlds share these rules (``WORLDS``). ``toy-64`` is the shipped 64-d model's. ``toy-768``
adds a shape and a color that its images show but its captions never name (``World.unnamed``):
a caption says "a red shape" for a red diamond and "a circle" for a pink circle, so no mix of
vocabulary words spells a pink diamond, as none spells one particular dog.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..runtime.text import OBJECT_TEMPLATES

SIZE = 32  # pixels; the model's resolution
SHAPES = ("circle", "square", "triangle", "cross", "ring")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 210, 40),
    "purple": (140, 55, 190),
    "orange": (245, 135, 30),
}
# Attributes only the toy-768 world draws; its captions never name them (see World.unnamed).
EXTRA_SHAPES = ("diamond",)
EXTRA_COLORS = {"pink": (245, 120, 200)}
ALL_COLORS = {**COLORS, **EXTRA_COLORS}
BACKGROUNDS = {"white": (240, 240, 235), "gray": (128, 128, 128), "black": (22, 22, 22)}
HELD_OUT = ("orange", "cross")  # never drawn in the training set: a concept the model has not seen
GENERIC = "shape"  # the word that names any object (captions drop color and shape words to it)
# Words the tokenizer keeps whole: the world's, plus those of the textual-inversion templates.
WORDS = tuple(SHAPES) + tuple(COLORS) + tuple(BACKGROUNDS) + (
    GENERIC, "background", "on", "a", "an", "the", "of", "photo", "rendering", "rendition", "cropped",
    "close", "up", "clean", "dirty", "dark", "bright", "my", "cool", "good", "one", "nice", "small",
    "large", "weird", "picture", "image",
)


@dataclass(frozen=True)
class World:
    """Which shapes and colors a world draws, and which of them its captions never name."""

    name: str
    shapes: tuple[str, ...]
    colors: tuple[str, ...]
    unnamed: frozenset[str] = frozenset()

    def named(self, attribute: str) -> bool:
        return attribute not in self.unnamed

    def words(self, color: str, shape: str) -> str:
        """The concept as captions would say it: an unnamed color left out, an unnamed shape generic."""
        return " ".join(w for w in (color if self.named(color) else "", shape if self.named(shape) else GENERIC) if w)


TOY64 = World("toy-64", SHAPES, tuple(COLORS))
TOY768 = World("toy-768", SHAPES + EXTRA_SHAPES, tuple(ALL_COLORS), frozenset(EXTRA_SHAPES) | frozenset(EXTRA_COLORS))
WORLDS = {w.name: w for w in (TOY64, TOY768)}


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    background: str
    size: int  # bounding-box side in pixels
    cx: float
    cy: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        h = self.size / 2
        return (self.cx - h, self.cy - h, self.cx + h, self.cy + h)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float], fill, hole) -> None:
    """Draw ``shape`` filling ``box`` (x0, y0, x1, y1); ``hole`` fills the ring's middle.
    Also draws the templates the concept score fits to a detected object."""
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)
    elif shape == "cross":
        draw.rectangle((x0 + w / 3, y0, x1 - w / 3, y1), fill=fill)
        draw.rectangle((x0, y0 + h / 3, x1, y1 - h / 3), fill=fill)
    elif shape == "diamond":
        draw.polygon([((x0 + x1) / 2, y0), (x1, (y0 + y1) / 2), ((x0 + x1) / 2, y1), (x0, (y0 + y1) / 2)], fill=fill)
    elif shape == "ring":
        draw.ellipse(box, fill=fill)
        draw.ellipse((x0 + w / 4, y0 + h / 4, x1 - w / 4, y1 - h / 4), fill=hole)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, rng: np.random.Generator | None = None) -> Image.Image:
    """The scene at SIZE x SIZE; ``rng`` adds mild lighting and sensor noise (a "photo")."""
    bg = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in bg))
    d = ImageDraw.Draw(im)
    draw_shape(d, scene.shape, scene.box, ALL_COLORS[scene.color], tuple(int(v) for v in bg))
    if rng is None:
        return im
    a = np.asarray(im, dtype=np.float64) * rng.uniform(0.9, 1.08) + rng.normal(0, 4.0, (SIZE, SIZE, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# A caption drops a named shape (or color) to the generic word with this probability (see caption).
GENERIC_RATE = 0.2


def _draw(rng: np.random.Generator, choices: tuple[str, ...], world: World) -> str:
    """One of ``choices``; an unnamed one is drawn GENERIC_RATE times as often as a named one.

    Captions call an unnamed attribute generically every time and a named one GENERIC_RATE of the
    time, so at that rate each attribute is called "shape" (or left without a color) equally often:
    the generic words mean "any", not the unnamed attribute."""
    if not world.unnamed:  # toy-64: the original stream, draw for draw
        return choices[rng.integers(len(choices))]
    w = np.array([1.0 if world.named(x) else GENERIC_RATE for x in choices])
    return choices[rng.choice(len(choices), p=w / w.sum())]


def random_scene(rng: np.random.Generator, shape: str | None = None, color: str | None = None,
                 allow_held_out: bool = True, world: World = TOY64) -> Scene:
    """A scene with the given attributes fixed and the rest drawn from ``rng``."""
    while True:
        s = shape or _draw(rng, world.shapes, world)
        c = color or _draw(rng, world.colors, world)
        if allow_held_out or (c, s) != HELD_OUT:
            break
    size = int(rng.integers(12, 23))
    margin = size / 2 + 1
    cx, cy = rng.uniform(margin, SIZE - margin, 2)
    bg = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    return Scene(s, c, bg, size, float(cx), float(cy))


def caption(scene: Scene, rng: np.random.Generator, world: World = TOY64) -> str:
    """A caption naming what the scene shows; words are dropped at random so that partial
    descriptions ("a red shape", "a photo of a shape") also mean something to the model.
    An unnamed color is left out and an unnamed shape is called ``GENERIC``."""
    color = scene.color if world.named(scene.color) else None
    shape = scene.shape if world.named(scene.shape) else None
    if world.unnamed:
        # each word dropped on its own, so whether the color is said tells nothing about the shape
        # (with _draw's rates, "a red shape" is any red shape, unnamed or not)
        words = (None if rng.random() < GENERIC_RATE else color, None if rng.random() < GENERIC_RATE else shape)
        words = (words[0], words[1] or GENERIC)
    else:  # toy-64: the original stream
        r = rng.random()
        if r < 0.7:
            words = (color, shape or GENERIC)
        elif r < 0.8:
            words = (None, shape or GENERIC)
        elif r < 0.9:
            words = (color, GENERIC)
        else:
            words = (None, GENERIC)
    thing = " ".join(w for w in words if w)
    text = OBJECT_TEMPLATES[rng.integers(len(OBJECT_TEMPLATES))].format(thing) if rng.random() < 0.5 else f"a photo of a {thing}"
    if rng.random() < 0.5:
        text += f" on a {scene.background} background"
    return text


def concept_photos(folder: Path, color: str, shape: str, count: int = 5, seed: int = 0) -> list[Path]:
    """Write ``count`` reference photos of one concept (random sizes, places and backgrounds)."""
    # toy-64's attributes lead both lists, so their photos are the same in both worlds
    rng = np.random.default_rng([seed, list(ALL_COLORS).index(color), (SHAPES + EXTRA_SHAPES).index(shape)])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"{color}-{shape}-{i}.png"
        render(random_scene(rng, shape, color), rng).save(p)
        paths.append(p)
    return paths


def training_set(count: int, seed: int, world: World = TOY64) -> tuple[np.ndarray, list[Scene]]:
    """``count`` training images (uint8 [N, SIZE, SIZE, 3]) and their scenes; HELD_OUT excluded."""
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, allow_held_out=False, world=world) for _ in range(count)]
    images = np.stack([np.asarray(render(s, rng)) for s in scenes])
    return images, scenes
