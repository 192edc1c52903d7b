"""Checkpoints: nested state (arrays + JSON values) in one safetensors file, written atomically.

Arrays become tensors named by their path ("opt.adam.m"); everything else (ints, the
PCG64 state's 128-bit integers, strings) goes to the metadata as one JSON document. A
sha256 over that document and every tensor (name, dtype, shape, bytes) is stored beside it
and verified on load, so a checkpoint damaged on disk is refused instead of resumed.
No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def _checksum(document: str, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256(document.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(json.dumps([name, a.dtype.str, list(a.shape)]).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {}
    tree = json.dumps(_split(state, "", arrays))
    write_atomic(Path(path), save(arrays, metadata={"zoodip_edge_checkpoint": tree,
                                                    "zoodip_edge_checksum": _checksum(tree, arrays)}))


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
    except (SafetensorError, KeyError, TypeError, ValueError, OSError, RecursionError):
        return None
    return identity if isinstance(identity, dict) else {}


def check_checkpoint_path(path: Path, resume: bool) -> dict[str, Any] | None:
    """Before any work: a checkpoint path may hold nothing or a zoodip-edge checkpoint (never a
    file of the user's), and must hold one to resume. Returns that checkpoint's identity."""
    theirs = checkpoint_identity(path)
    if os.path.lexists(path) and theirs is None:
        raise UserError(f"{path} exists and is not a zoodip-edge checkpoint; it will not be replaced (choose another --checkpoint)")
    if resume and theirs is None:
        raise UserError(f"--resume: no checkpoint at {path}")
    return theirs


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved at ``path``, its checksum verified; UserError (one line) if it is not a
    checkpoint or does not match its checksum."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        arrays = load_file(str(path))
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
        document = meta["zoodip_edge_checkpoint"]
        tree = json.loads(document)
    except (SafetensorError, KeyError, ValueError, OSError, RecursionError) as e:
        raise UserError(f"{path} is not a zoodip-edge checkpoint ({type(e).__name__})") from None
    if "zoodip_edge_checksum" not in meta:
        raise UserError(f"{path} has no checksum (an older zoodip-edge wrote it); start over with --force")
    if meta["zoodip_edge_checksum"] != _checksum(document, arrays):
        raise UserError(f"{path} does not match its checksum (damaged or modified); it will not be resumed")
    try:
        return _join(tree, arrays)
    except (KeyError, TypeError, RecursionError) as e:
        raise UserError(f"{path}: checkpoint names a tensor it does not hold ({e})") from None
