"""DreamBooth evaluation prompts and subject classes, built in (no downloads, no heavy imports).

Copied verbatim from the DreamBooth dataset repository, google/dreambooth
``dataset/prompts_and_classes.txt`` (commit e9b8c013ef2e30ab3d5d9018808513e9093e3bc4):
25 prompts for objects and 25 for live subjects (the dogs and cats). In the original, ``{0}``
is the unique token and ``{1}`` the class noun (``'...'.format(unique_token, class_token)``).
"""

from __future__ import annotations

from .errors import UserError

OBJECT_PROMPTS: tuple[str, ...] = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

LIVE_PROMPTS: tuple[str, ...] = (
    "a {0} {1} in the jungle",
    "a {0} {1} in the snow",
    "a {0} {1} on the beach",
    "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric",
    "a {0} {1} on top of a wooden floor",
    "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background",
    "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit",
    "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt",
    "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a shiny {0} {1}",
    "a wet {0} {1}",
    "a cube shaped {0} {1}",
)

# The 30 DreamBooth subjects (folder name -> class noun), from the same file.
SUBJECT_CLASSES: dict[str, str] = {
    "backpack": "backpack",
    "backpack_dog": "backpack",
    "bear_plushie": "stuffed animal",
    "berry_bowl": "bowl",
    "can": "can",
    "candle": "candle",
    "cat": "cat",
    "cat2": "cat",
    "clock": "clock",
    "colorful_sneaker": "sneaker",
    "dog": "dog",
    "dog2": "dog",
    "dog3": "dog",
    "dog5": "dog",
    "dog6": "dog",
    "dog7": "dog",
    "dog8": "dog",
    "duck_toy": "toy",
    "fancy_boot": "boot",
    "grey_sloth_plushie": "stuffed animal",
    "monster_toy": "toy",
    "pink_sunglasses": "glasses",
    "poop_emoji": "toy",
    "rc_car": "toy",
    "red_cartoon": "cartoon",
    "robot_toy": "toy",
    "shiny_sneaker": "sneaker",
    "teapot": "teapot",
    "vase": "vase",
    "wolf_plushie": "stuffed animal",
}

LIVE_CLASSES = frozenset({"dog", "cat"})


def subject_kind(subject_or_class: str) -> str:
    """``"live"`` for the dogs and cats (by subject folder name or class noun), else ``"object"``."""
    cls = SUBJECT_CLASSES.get(subject_or_class, subject_or_class)
    return "live" if cls in LIVE_CLASSES else "object"


def prompt_templates(kind: str) -> tuple[str, ...]:
    """The 25 raw templates (with ``{0}`` = unique token, ``{1}`` = class noun) for ``kind``."""
    if kind == "object":
        return OBJECT_PROMPTS
    if kind == "live":
        return LIVE_PROMPTS
    raise UserError(f"unknown prompt kind {kind!r}: use 'object' or 'live'")


def dreambooth_prompts(kind: str, token: str, class_word: str) -> list[str]:
    """The 25 DreamBooth evaluation prompts for ``kind`` ("object" or "live"), filled in."""
    return [t.format(token, class_word) for t in prompt_templates(kind)]
