"""The device stage: NumPy and ONNX Runtime only (no torch, diffusers or transformers).

``from zoodip_edge.runtime import Personalizer, Settings, Generator`` gives the Python API that
the CLI uses; the names load on first use, so importing a light module of this package (images,
text) does not start ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {"Personalizer": "personalize", "Settings": "personalize", "Generator": "generate"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
