"""Learned-embedding files: write what diffusers and A1111 load as is, read them back safely.

Only NumPy, safetensors and the standard library: no torch, on the device or anywhere else.

Layouts written by :func:`save_embedding` (always safetensors, float32):

* ``fmt="diffusers"`` (default): ``{"<tok>": float32[k, d]}`` (``[1, d]`` for one vector),
  the file ``StableDiffusionPipeline.load_textual_inversion`` reads: it takes a state dict
  with a single key as ``token -> embedding`` (diffusers/loaders/textual_inversion.py,
  ``_retrieve_tokens_and_embeddings``: ``elif len(state_dict) == 1: loaded_token, embedding
  = next(iter(state_dict.items()))``) and splits ``[k, d]`` into ``<tok>, <tok>_1, …``
  (``_extend_tokens_and_embeddings``). Name it ``learned_embeds.safetensors`` to load a
  folder. A1111 reads this file too (one tensor), with the file name as the prompt word.
* ``fmt="a1111"``: ``{"emb_params": float32[k, d]}`` with metadata ``name = <tok>``, the
  layout kohya-ss sd-scripts write and the one most shared ``*.safetensors`` embeddings use.
  What A1111 does with a ``.safetensors`` embedding (modules/textual_inversion/
  textual_inversion.py): ``safetensors.torch.load_file`` (metadata is never read), then
  ``create_embedding_from_data`` takes any dict holding exactly one tensor ("diffuser
  concepts" branch; a 1-D tensor becomes ``[1, d]``), and the prompt word is the **file
  name without extension**, not the key and not the metadata. So save it as
  ``<word>.safetensors`` in A1111's ``embeddings/`` folder (avoid ``<``/``>`` on Windows).
  diffusers loads it only with an explicit ``token=`` (its key is ``emb_params``).
* SDXL (either ``fmt``; pass ``vector={"clip_l": [k, 768], "clip_g": [k, 1280]}``):
  ``{"clip_l": …, "clip_g": …}`` with metadata ``name = <tok>``, which A1111 loads (its
  "SDXL embedding" branch) and diffusers loads with two ``load_textual_inversion`` calls.

All files carry metadata ``name`` (the token) plus the caller's provenance (bundle hash,
steps, hyperparameters), stringified since safetensors metadata is ``str -> str``: strings
as given, everything else JSON-encoded (``5`` -> ``"5"``, ``{"a": 1}`` -> ``'{"a": 1}'``).
Files are written atomically (temp file in the same folder, fsync, ``os.replace``).

:func:`load_embedding` reads those layouts, plus diffusers ``learned_embeds.bin`` and A1111
``.pt`` files written by ``torch.save`` (zip format, and the pre-1.6 legacy format), through
a restricted unpickler that knows only the few globals a tensor needs and maps them to
NumPy; a file naming any other global (which is how pickles run code) is refused unread.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from zoodip_edge.errors import UserError
from zoodip_edge.files import write_atomic as _write_atomic

__all__ = ["save_embedding", "load_embedding", "check_embedding_output", "SDXL_KEYS"]

#: Keys of the SDXL two-encoder layout.
SDXL_KEYS = ("clip_l", "clip_g")
_A1111_KEY = "emb_params"
_FORMATS = ("diffusers", "a1111")

Vector = np.ndarray | Mapping[str, np.ndarray]


# ============================================================================ saving


def save_embedding(
    path: str | os.PathLike[str],
    token: str,
    vector: Vector,
    metadata: Mapping[str, Any] | None = None,
    fmt: str = "diffusers",
) -> None:
    """Write a learned embedding as safetensors, atomically (see the module docstring).

    ``vector`` is ``[d]`` or ``[k, d]`` (stored as float32 ``[1, d]`` / ``[k, d]``), or for
    SDXL a mapping ``{"clip_l": [k, 768], "clip_g": [k, 1280]}``. ``fmt`` is ``"diffusers"``
    (key = token) or ``"a1111"`` (key ``emb_params``). ``metadata`` values are stringified
    (JSON for non-strings); the key ``name`` is reserved for the token. Parent folders are
    created. On any error nothing is left at ``path`` (an existing file there is kept).
    """
    p = Path(path)
    if fmt not in _FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    check_embedding_output(p, token, fmt, sdxl=isinstance(vector, Mapping))

    if isinstance(vector, Mapping):
        tensors = _sdxl_tensors(vector)
    else:
        arr = _as_matrix(vector, "vector")
        tensors = {token: arr} if fmt == "diffusers" else {_A1111_KEY: arr}

    meta = {"name": token}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str):
            raise TypeError(f"metadata keys must be strings, got {key!r}")
        if key == "__metadata__":
            raise ValueError("'__metadata__' is not a valid metadata key")
        s = _meta_str(key, value)
        if key == "name" and s != token:
            raise ValueError(f"metadata 'name' is reserved for the token ({token!r}), got {s!r}")
        meta[key] = s

    from safetensors.numpy import save as _st_save  # light import, kept local

    data = _st_save(tensors, metadata=meta)
    _write_atomic(p, data)


def check_embedding_output(path: str | os.PathLike[str], token: str, fmt: str = "diffusers", sdxl: bool = False) -> None:
    """What ``save_embedding`` would refuse about a file name, token and layout, in one line: a
    command checks it before its work, not after."""
    if fmt not in _FORMATS:
        raise UserError(f"unknown format {fmt!r} (choose {' or '.join(_FORMATS)})")
    if not isinstance(token, str) or not token.strip() or token != token.strip():
        raise UserError(f"the token must be a non-empty word without surrounding spaces, got {token!r}")
    if Path(path).suffix.lower() != ".safetensors":
        raise UserError(f"embeddings are written as safetensors: name the file *.safetensors, not {Path(path).name}")
    if fmt == "diffusers" and not sdxl and (token in SDXL_KEYS or token == _A1111_KEY):
        raise UserError(f"the token {token!r} is reserved by the embedding file layouts; choose another")


def _as_matrix(vector: Any, what: str, error: type[Exception] = ValueError) -> np.ndarray:
    """float32 ``[k, d]`` from ``[d]`` or ``[k, d]``; ValueError for callers' mistakes, UserError for files."""
    arr = np.asarray(vector)
    if arr.dtype.kind not in "fiu":
        raise error(f"{what} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise error(f"{what} has shape {list(np.shape(vector))}, expected [d] or [k, d]")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise error(f"{what} contains NaN or infinite values")
    return arr


def _sdxl_tensors(vector: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if set(vector) != set(SDXL_KEYS):
        raise ValueError(f"an SDXL embedding needs exactly the keys {SDXL_KEYS}, got {sorted(vector)}")
    out = {k: _as_matrix(vector[k], k) for k in SDXL_KEYS}
    if out["clip_l"].shape[0] != out["clip_g"].shape[0]:
        raise ValueError(
            f"clip_l and clip_g need the same number of vectors, got "
            f"{out['clip_l'].shape[0]} and {out['clip_g'].shape[0]}"
        )
    return out


def _meta_str(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        return json.dumps(value, sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata {key!r}: cannot store a {type(value).__name__} ({e})") from None


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    raise TypeError(f"{type(o).__name__} is not JSON serializable")




# ============================================================================ loading


def load_embedding(path: str | os.PathLike[str]) -> tuple[str | None, Vector, dict[str, str]]:
    """Read a textual-inversion embedding: ``(token or None, float32 [k, d], metadata)``.

    Formats are recognised by content, not by extension: safetensors (diffusers
    ``{tok: [k, d]}`` or ``[d]``, kohya/A1111 ``{"emb_params": …}``, SDXL
    ``{"clip_l", "clip_g"}``) and ``torch.save`` files (diffusers ``{tok: tensor}``, A1111
    ``{"string_to_param": {"*": tensor}, "name": …}``) read without torch and without
    running pickled code. For SDXL files the second value is
    ``{"clip_l": [k, 768], "clip_g": [k, 1280]}``. The token is the diffusers key, the A1111
    ``name``, or the ``name`` metadata; ``None`` when the file does not say (A1111 takes it
    from the file name). ``metadata`` is ``str -> str``: the safetensors metadata, or the
    scalar entries of a ``.pt`` (``step``, ``sd_checkpoint``…).

    Raises :class:`UserError` for a missing or unrecognised file, pickled code, several
    tensors without an obvious token, a shape other than ``[d]``/``[k, d]``, or NaN/inf.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        from .files import check_regular_file

        check_regular_file(p, "embedding file")
    try:
        with open(p, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise UserError(f"embedding file not found: {p}") from None
    except IsADirectoryError:
        raise UserError(f"embedding path is a folder, not a file: {p}") from None
    except PermissionError:
        raise UserError(f"cannot read embedding file {p}: permission denied") from None
    except OSError as e:
        raise UserError(f"cannot read embedding file {p}: {e.strerror or e}") from None
    if not head:
        raise UserError(f"embedding file {p} is empty")

    if _looks_like_safetensors(p, head):
        tensors, meta = _read_safetensors(p)
        return _interpret_safetensors(p, tensors, meta)
    if head.startswith(b"PK\x03\x04"):
        return _interpret_pickled(p, _read_torch_zip(p))
    # Anything else may be a legacy torch.save or a plain pickle: the restricted unpickler
    # decides, refusing code before it can run.
    return _interpret_pickled(p, _read_torch_legacy(p))


def _looks_like_safetensors(p: Path, head: bytes) -> bool:
    if len(head) < 8:
        return False
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= _MAX_HEADER:
        return False
    try:
        with open(p, "rb") as f:
            f.seek(8)
            return f.read(1) == b"{" and 8 + n <= os.fstat(f.fileno()).st_size
    except OSError:
        return False


# ---------------------------------------------------------------- safetensors

_ST_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # widened to float32 below
}
_MAX_HEADER = 100 * 1024 * 1024
_MAX_TENSORS = 8  # an embedding file holds 1 or 2; a checkpoint holds hundreds


def _read_safetensors(p: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """A strict reader of the safetensors layout (8-byte header size, JSON header, data)."""

    def bad(why: str) -> UserError:
        return UserError(f"cannot read embedding file {p}: not a safetensors or torch file ({why})")

    size = p.stat().st_size
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise bad("too short")
        (n,) = struct.unpack("<Q", raw)
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise bad("bad header size")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise bad("header is not JSON") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise bad("metadata is not a string map")
        if not header:
            raise UserError(f"embedding file {p} holds no tensors")
        if len(header) > _MAX_TENSORS:
            raise UserError(
                f"{p} holds {len(header)} tensors: it is not a textual-inversion embedding "
                "(a model checkpoint?)"
            )
        data_len = size - 8 - n
        tensors: dict[str, np.ndarray] = {}
        for key, info in header.items():
            try:
                dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            except (TypeError, KeyError, ValueError):
                raise bad(f"malformed entry {key!r}") from None
            if dtype_name not in _ST_DTYPES:
                raise UserError(f"{p}: tensor {key!r} has dtype {dtype_name}, expected a float type")
            if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
                raise bad(f"malformed shape of {key!r}")
            dt = _ST_DTYPES[dtype_name]
            nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
            if not (isinstance(begin, int) and isinstance(end, int)) or not (
                0 <= begin <= end <= data_len and end - begin == nbytes
            ):
                raise bad(f"data offsets of {key!r} do not match its shape")
            f.seek(8 + n + begin)
            buf = f.read(nbytes)
            arr = np.frombuffer(buf, dtype=dt).reshape(shape)
            tensors[key] = _bf16_to_f32(arr) if dtype_name == "BF16" else arr.astype(np.float32)
    return tensors, dict(meta)


def _interpret_safetensors(p: Path, tensors: dict[str, np.ndarray], meta: dict[str, str]):
    name = meta.get("name") or None
    if set(tensors) == set(SDXL_KEYS):
        vec = {k: _check_matrix(p, tensors[k], k) for k in SDXL_KEYS}
        if vec["clip_l"].shape[0] != vec["clip_g"].shape[0]:
            raise UserError(f"{p}: clip_l and clip_g hold different numbers of vectors")
        return name, vec, meta
    if len(tensors) != 1:
        raise UserError(
            f"{p} holds {len(tensors)} tensors ({', '.join(sorted(tensors))}); an embedding file "
            "holds one (its key is the token) or clip_l + clip_g (SDXL)"
        )
    key, arr = next(iter(tensors.items()))
    vec = _check_matrix(p, arr, key)
    token = name if key == _A1111_KEY else key
    return token, vec, meta


def _check_matrix(p: Path, arr: np.ndarray, key: str) -> np.ndarray:
    return _as_matrix(arr, f"{p}: embedding {key!r}", UserError)


def _bf16_to_f32(u16: np.ndarray) -> np.ndarray:
    return (u16.astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- torch.save, without torch


class _PickledCode(Exception):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _NotTorch(Exception):
    pass


# The legacy storage classes torch.save names (torch/storage.py: ``pickle_storage_type``).
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype("f4"),
    "HalfStorage": np.dtype("f2"),
    "DoubleStorage": np.dtype("f8"),
    "BFloat16Storage": np.dtype("u2"),  # widened to float32
    "LongStorage": np.dtype("i8"),
    "IntStorage": np.dtype("i4"),
    "ShortStorage": np.dtype("i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stands for ``torch.FloatStorage`` & co. in the pickle; never called."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage named by a persistent id; its bytes are attached after unpickling."""

    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.stype, self.key, self.numel = stype, key, numel
        self.array: np.ndarray | None = None


class _PendingTensor:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def materialize(self) -> np.ndarray:
        st = self.storage
        if st.array is None:
            raise _NotTorch(f"storage {st.key!r} has no data")
        size, stride, offset = self.size, self.stride, self.offset
        if not (
            isinstance(offset, int)
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in size + stride)
            and offset >= 0
        ):
            raise _NotTorch("malformed tensor record")
        if 0 in size:
            return np.zeros(size, dtype=np.float32)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= st.array.size:
            raise _NotTorch("tensor reaches past its storage")
        item = st.array.itemsize
        view = np.lib.stride_tricks.as_strided(
            st.array[offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
        )
        if st.stype.name == "BFloat16Storage":
            return _bf16_to_f32(np.ascontiguousarray(view))
        return np.array(view, dtype=np.float32)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise _NotTorch("tensor without storage")
    return _PendingTensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals of plain tensors, to NumPy stand-ins; anything else is refused.

    Every way a pickle reaches a callable (GLOBAL, STACK_GLOBAL, INST, OBJ, EXT*) goes
    through ``find_class``, so refusing here refuses before any of it can run.
    """

    def __init__(self, file, storages: dict[str, _Storage], legacy: bool = False):
        super().__init__(file)
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _PickledCode(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise _NotTorch("unknown persistent id")
        _, stype, key, _location, numel = pid[:5]
        if self._legacy and len(pid) > 5 and pid[5] is not None:
            raise _NotTorch("legacy storage views are not supported")
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _NotTorch("malformed storage record")
        st = self._storages.get(key)
        if st is None:
            st = self._storages[key] = _Storage(stype, key, numel)
        elif st.stype is not stype or st.numel != numel:
            raise _NotTorch("inconsistent storage records")
        return st


def _unpickle(p: Path, stream, storages, legacy=False):
    try:
        return _RestrictedUnpickler(stream, storages, legacy).load()
    except _PickledCode as e:
        raise UserError(
            f"refusing to load {p}: it contains pickled code ({e.qualname}); "
            "only plain tensors are read from .pt/.bin files, convert it to safetensors on a trusted machine"
        ) from None
    except _NotTorch:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed pickle, whatever the opcode did
        raise _NotTorch(f"bad pickle: {type(e).__name__}") from None


def _read_torch_zip(p: Path) -> Any:
    try:
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
            pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pkls) != 1 or pkls[0].count("/") > 1:
                raise UserError(f"cannot read {p}: a zip file but not a torch.save file")
            prefix = pkls[0][: -len("data.pkl")]
            if z.getinfo(pkls[0]).file_size > _MAX_PICKLE:
                raise UserError(f"cannot read {p}: its pickle is too large for an embedding file")
            big = prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() == b"big"
            storages: dict[str, _Storage] = {}
            try:
                obj = _unpickle(p, io.BytesIO(z.read(pkls[0])), storages)
                total = sum(st.numel * st.stype.dtype.itemsize for st in storages.values())
                if total > _MAX_TENSOR_BYTES:
                    raise _NotTorch(f"{total} bytes of tensors, too many for an embedding file")
                for key, st in storages.items():
                    entry = prefix + "data/" + key
                    if entry not in names:
                        raise _NotTorch(f"missing data/{key}")
                    want = st.numel * st.stype.dtype.itemsize
                    if z.getinfo(entry).file_size != want:
                        raise _NotTorch(f"data/{key} has the wrong size")
                    dt = st.stype.dtype.newbyteorder(">" if big else "<")
                    st.array = np.frombuffer(z.read(entry), dtype=dt)
                return _materialize(obj)
            except _NotTorch as e:
                raise UserError(f"cannot read {p}: malformed torch file ({e})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError):
        raise UserError(f"cannot read {p}: damaged zip/torch file") from None


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
# diffusers' train script saves a slice of the whole token table (the storage comes along):
# ~200 MB for SD2. Cap well above that, well below what would exhaust a device.
_MAX_TENSOR_BYTES = 1 << 30
_MAX_PICKLE = 64 << 20


def _read_torch_legacy(p: Path) -> Any:
    """torch.save's pre-1.6 format: magic, version, sys_info, object, storage keys, raw data."""
    with open(p, "rb") as f:
        storages: dict[str, _Storage] = {}
        try:
            try:
                magic = _unpickle(p, f, storages)
            except _NotTorch:
                raise UserError(
                    f"cannot read {p}: not an embedding file (expected safetensors, or a torch .pt/.bin)"
                ) from None
            if magic != _LEGACY_MAGIC:
                raise UserError(
                    f"cannot read {p}: a pickle, but not a torch.save file (only tensor files are read)"
                )
            version = _unpickle(p, f, storages)
            sys_info = _unpickle(p, f, storages)
            if version != 1001 or not isinstance(sys_info, dict):
                raise _NotTorch("unsupported legacy version")
            little = bool(sys_info.get("little_endian", True))
            obj = _unpickle(p, f, storages, legacy=True)
            keys = _unpickle(p, f, storages)
            if not isinstance(keys, list) or set(keys) != set(storages):
                raise _NotTorch("storage list does not match")
            order = "<" if little else ">"
            for key in keys:
                st = storages[key]
                raw = f.read(8)
                if len(raw) != 8:
                    raise _NotTorch("truncated")
                (numel,) = struct.unpack(order + "q", raw)
                if numel != st.numel or numel * st.stype.dtype.itemsize > _MAX_TENSOR_BYTES:
                    raise _NotTorch("storage size mismatch")
                dt = st.stype.dtype.newbyteorder(order)
                buf = f.read(numel * dt.itemsize)
                if len(buf) != numel * dt.itemsize:
                    raise _NotTorch("truncated")
                st.array = np.frombuffer(buf, dtype=dt)
            return _materialize(obj)
        except _NotTorch as e:
            raise UserError(f"cannot read {p}: not a readable torch file ({e})") from None


def _materialize(obj: Any, depth: int = 0) -> Any:
    if depth > 20:
        raise _NotTorch("nested too deeply")
    if isinstance(obj, _PendingTensor):
        return obj.materialize()
    if isinstance(obj, dict):
        return {k: _materialize(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, depth + 1) for v in obj)
    if isinstance(obj, (_Storage, _StorageType)):
        raise _NotTorch("bare storage object")
    return obj


def _interpret_pickled(p: Path, obj: Any):
    if isinstance(obj, np.ndarray):
        raise UserError(f"{p} holds a bare tensor without a token; re-save it as {{token: tensor}}")
    if not isinstance(obj, dict):
        raise UserError(f"{p} does not hold a dict of tensors (got {type(obj).__name__})")
    meta = {
        str(k): v if isinstance(v, str) else json.dumps(v)
        for k, v in obj.items()
        if isinstance(k, str) and isinstance(v, (str, int, float, bool)) and k != "string_to_token"
    }
    if "string_to_param" in obj:  # A1111 / original textual_inversion
        params = obj["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise UserError(f"{p}: 'string_to_param' must hold exactly one embedding")
        (key, arr), = params.items()
        if not isinstance(arr, np.ndarray):
            raise UserError(f"{p}: 'string_to_param' does not hold a tensor")
        name = obj.get("name")
        return (name if isinstance(name, str) and name else None), _check_matrix(p, arr, str(key)), meta
    tensors = {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}
    if set(tensors) == set(SDXL_KEYS):
        vec = {k: _check_matrix(p, tensors[k], k) for k in SDXL_KEYS}
        name = obj.get("name")
        return (name if isinstance(name, str) and name else None), vec, meta
    if len(tensors) != 1 or len(obj) != 1:
        raise UserError(
            f"{p} holds {len(tensors)} tensor(s) among keys {', '.join(map(str, obj))}; expected "
            "{token: tensor} (diffusers) or {'string_to_param': {'*': tensor}, 'name': …} (A1111)"
        )
    (key, arr), = tensors.items()
    if not isinstance(key, str):
        raise UserError(f"{p}: the token key is not a string ({key!r})")
    return key, _check_matrix(p, arr, key), {}
