"""The toy world: procedural shape images, a small trained SD-architecture model of them,
its shipped int8 bundle, and a concept score that does not use the model.

Device-safe: NumPy and Pillow only (training lives in ``zoodip_edge.toy.train``, torch).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def shipped_path(name: str) -> Path:
    """Path of a file or folder shipped in this package (``model``, ``bundle``, ``provenance.json``)."""
    return Path(str(resources.files(__name__).joinpath(name)))
