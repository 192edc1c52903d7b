"""Checkpoints: nested state (arrays + JSON values) in one safetensors file, written atomically.

Arrays become tensors named by their path ("opt.adam.m"); everything else (ints, the
PCG64 state's 128-bit integers, strings) goes to the metadata as one JSON document.
No pickle is involved anywhere.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from ..errors import UserError
from ..files import write_atomic


def _split(state: Any, prefix: str, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(state, np.ndarray):
        arrays[prefix] = np.ascontiguousarray(state)
        return {"__array__": prefix}
    if isinstance(state, dict):
        return {k: _split(v, f"{prefix}.{k}" if prefix else k, arrays) for k, v in state.items()}
    if isinstance(state, (np.integer, np.floating)):
        return state.item()
    return state


def _join(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__array__"}:
            return arrays[tree["__array__"]]
        return {k: _join(v, arrays) for k, v in tree.items()}
    return tree


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    tree = _split(state, "", arrays)
    write_atomic(Path(path), save(arrays, metadata={"zoodip_edge_checkpoint": json.dumps(tree)}))


def checkpoint_identity(path: Path) -> dict[str, Any] | None:
    """The run identity a zoodip-edge checkpoint at ``path`` records ({} if it records none), or
    None if ``path`` is not one. Reads only the file's header, whatever the file is."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tree = json.loads(meta["zoodip_edge_checkpoint"])
        identity = json.loads(tree["identity"]) if isinstance(tree, dict) and "identity" in tree else {}
    except (SafetensorError, KeyError, TypeError, ValueError, OSError):
        return None
    return identity if isinstance(identity, dict) else {}


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        arrays = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        tree = json.loads(meta["zoodip_edge_checkpoint"])
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as e:
        raise UserError(f"{path} is not a zoodip-edge checkpoint ({type(e).__name__})") from None
    return _join(tree, arrays)
