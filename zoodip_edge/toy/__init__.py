"""The toy world: procedural shape images, a small trained SD-architecture model of them,
its shipped int8 bundle, and a concept score that does not use the model.

Device-safe: NumPy and Pillow only (training lives in ``zoodip_edge.toy.train``, torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import UserError
from .world import TOY64, TOY768, World


@dataclass(frozen=True)
class ToyModel:
    """A shipped toy model: its world, its diffusers folder and its int8 bundle (package-relative)."""

    name: str
    world: World
    model: str
    bundle: str


TOY_MODELS = {m.name: m for m in (ToyModel("toy-64", TOY64, "model", "bundle"),
                                   ToyModel("toy-768", TOY768, "model-768", "bundle-768"))}
DEFAULT_TOY = "toy-64"


def toy_model(name: str) -> ToyModel:
    if name not in TOY_MODELS:
        raise UserError(f"unknown toy model {name!r} (choose from {', '.join(TOY_MODELS)})")
    return TOY_MODELS[name]


def shipped_path(name: str) -> Path:
    """Path of a file or folder shipped in this package (``model``, ``bundle``, ``provenance.json``)."""
    return Path(str(resources.files(__name__).joinpath(name)))
