"""Prompts -> token embeddings in NumPy: the bundle's tokenizer plus one new token.

The embedding table is memory-mapped from the bundle's safetensors file, never copied:
only the rows a prompt uses are read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from ..bundle import check_token_ids
from ..errors import UserError
from ..schema import SchemaError

# Textual-inversion training templates (Gal et al.; the diffusers TI example's lists).
OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}", "a cropped photo of a {}",
    "a photo of the {}", "a good photo of the {}", "a photo of one {}", "a close-up photo of the {}",
    "a rendition of the {}", "a photo of the clean {}", "a rendition of a {}", "a photo of a nice {}",
    "a good photo of a {}", "a photo of the nice {}", "a photo of the small {}", "a photo of the weird {}",
    "a photo of the large {}", "a photo of a cool {}", "a photo of a small {}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
    "the painting in the style of {}", "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}", "a cool painting in the style of {}",
    "a close-up painting in the style of {}", "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}", "a small painting in the style of {}",
    "a weird painting in the style of {}", "a large painting in the style of {}",
]
TEMPLATES = {"object": OBJECT_TEMPLATES, "style": STYLE_TEMPLATES}


#: A safetensors header is kilobytes; one claiming more than this is refused unread.
MAX_HEADER_BYTES = 100 << 20


def mmap_safetensors(path: Path, name: str) -> np.ndarray:
    """Memory-map one tensor of a safetensors file (read-only; pages load on access). Whatever
    the header claims (its length, shape, offsets) is checked against the file before mapping."""
    dtypes = {"F16": np.float16, "F32": np.float32}
    size = Path(path).stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError("header length")
            header = json.loads(f.read(n))
        info = header[name] if isinstance(header, dict) else None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not a safetensors file (unreadable header)") from None
    except KeyError:
        raise UserError(f"{path}: no tensor {name!r}") from None
    if not isinstance(info, dict) or info.get("dtype") not in dtypes:
        raise UserError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype') if isinstance(info, dict) else info!r}")
    dtype, shape, offsets = np.dtype(dtypes[info["dtype"]]), info.get("shape"), info.get("data_offsets")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
            or not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= size - 8 - n
            or offsets[1] - offsets[0] != int(np.prod(shape, dtype=object)) * dtype.itemsize):
        raise UserError(f"{path}: tensor {name!r} has a shape or offsets that do not match the file")
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + n + offsets[0], shape=tuple(shape))


def bundle_prompt_encoder(bundle) -> "PromptEncoder":
    """The bundle's tokenizer and token table, the table checked against what the manifest says."""
    m = bundle.manifest
    path = bundle.path("token_embeddings")
    table = mmap_safetensors(path, m["token_embeddings"].get("tensor", "token_embedding"))
    want = m["token_embeddings"].get("shape")
    if table.ndim != 2 or (want is not None and list(table.shape) != want):
        raise UserError(f"{path}: token table has shape {list(table.shape)}; the manifest says {want}")
    text = m["text"]
    try:  # the manifest was checked against its own table shape; this is the file's
        check_token_ids(text, table.shape[0])
    except SchemaError as e:
        raise UserError(f"{bundle.root}: manifest {e}") from None
    return PromptEncoder(bundle.path("tokenizer"), table, text["max_length"], text["pad_token_id"])


class PromptEncoder:
    """Tokenizes prompts containing a new token and builds ``inputs_embeds`` rows."""

    def __init__(self, tokenizer_path: Path, table: np.ndarray, max_length: int, pad_id: int):
        self.tok = Tokenizer.from_file(str(tokenizer_path))
        self.tok.no_padding()
        self.tok.no_truncation()
        self.table = table
        self.max_length = max_length
        self.pad_id = pad_id
        self.token: str | None = None
        self.token_id: int | None = None
        self.extra: dict[int, np.ndarray] = {}  # ids of loaded embeddings -> their fixed row
        self.expand: dict[str, str] = {}  # multi-vector token -> "tok tok_1 ... tok_{k-1}"

    def single_token_id(self, word: str) -> int:
        ids = self.tok.encode(word, add_special_tokens=False).ids
        if len(ids) != 1:
            pieces = self.tok.encode(word, add_special_tokens=False).tokens
            raise UserError(f"initializer {word!r} is {len(ids)} tokens ({' '.join(pieces)}); choose a word that is exactly one token")
        return ids[0]

    def _check_new(self, token: str) -> None:
        if not token or any(c.isspace() for c in token):
            raise UserError(f"token {token!r} must be non-empty and contain no spaces")
        if self.tok.token_to_id(token) is not None or self.tok.token_to_id(token + "</w>") is not None:
            raise UserError(f"token {token!r} is already in the vocabulary; choose a new one, e.g. <my-{token.strip('<>')}>")

    def add_embedding(self, token: str, rows: np.ndarray) -> None:
        """Add a token with fixed vectors ``[k, d]`` (a learned embedding); k > 1 expands like diffusers."""
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        if rows.shape[1] != self.table.shape[1]:
            raise UserError(f"embedding for {token!r} has {rows.shape[1]} values per vector; this bundle's tokens have {self.table.shape[1]}")
        names = [token] + [f"{token}_{i}" for i in range(1, len(rows))]
        for name in names:
            self._check_new(name)
        self.tok.add_tokens(names)
        for name, row in zip(names, rows):
            self.extra[self.tok.token_to_id(name)] = row
        if len(names) > 1:
            self.expand[token] = " ".join(names)

    def add_token(self, token: str) -> int:
        """Append ``token`` to the vocabulary; its row is supplied per call (θ), not stored."""
        self._check_new(token)
        if self.tok.get_vocab_size(with_added_tokens=True) != self.table.shape[0] + len(self.extra):
            raise UserError(f"tokenizer and embedding table disagree ({self.tok.get_vocab_size()} vs {self.table.shape[0]} rows)")
        self.tok.add_tokens([token])
        self.token, self.token_id = token, self.tok.token_to_id(token)
        return self.token_id

    def ids(self, prompt: str) -> np.ndarray:
        for token, expanded in self.expand.items():
            prompt = prompt.replace(token, expanded)
        ids = self.tok.encode(prompt).ids
        if len(ids) > self.max_length:  # truncate like CLIP: keep the closing EOS
            ids = ids[: self.max_length - 1] + ids[-1:]
        return np.asarray(ids + [self.pad_id] * (self.max_length - len(ids)), dtype=np.int64)

    def dropped(self, prompt: str) -> str:
        """The end of ``prompt`` that ``ids`` truncates away ("" when it fits)."""
        for token, expanded in self.expand.items():
            prompt = prompt.replace(token, expanded)
        enc = self.tok.encode(prompt)
        if len(enc.ids) <= self.max_length:
            return ""
        cut = enc.offsets[self.max_length - 2][1]  # the end of the last token kept (BOS occupies one place)
        return prompt[cut:].strip()

    def embed(self, prompt: str, thetas: np.ndarray | None = None) -> np.ndarray:
        """``[B, L, d]`` float32 embeddings of ``prompt``, with the new token's rows set to each θ (B = len(thetas))."""
        ids = self.ids(prompt)
        vocab = self.table.shape[0]
        base = np.asarray(self.table[np.where(ids < vocab, ids, 0)], dtype=np.float32)
        for pos in np.flatnonzero(ids >= vocab):
            if int(ids[pos]) in self.extra:
                base[pos] = self.extra[int(ids[pos])]
        is_new = ids == self.token_id if self.token_id is not None else np.zeros_like(ids, bool)
        if thetas is None:
            return base[None]
        thetas = np.atleast_2d(thetas).astype(np.float32)
        out = np.repeat(base[None], len(thetas), axis=0)
        out[:, is_new] = thetas[:, None, :]
        return out
