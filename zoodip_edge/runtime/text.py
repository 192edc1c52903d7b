"""Prompts -> token embeddings in NumPy: the bundle's tokenizer plus one new token.

The embedding table is memory-mapped from the bundle's safetensors file, never copied:
only the rows a prompt uses are read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

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


def _encoder(bundle, text_key: str, table_key: str, tokenizer_key: str) -> "PromptEncoder":
    m = bundle.manifest
    path = bundle.path(table_key)
    table = mmap_safetensors(path, m[table_key].get("tensor", "token_embedding"))
    want = m[table_key].get("shape")
    if table.ndim != 2 or (want is not None and list(table.shape) != want):
        raise UserError(f"{path}: token table has shape {list(table.shape)}; the manifest says {want}")
    text = m[text_key]
    try:  # the manifest was checked against its own table shape; this is the file's
        check_token_ids(text, table.shape[0], text_key)
    except SchemaError as e:
        raise UserError(f"{bundle.root}: manifest {e}") from None
    return PromptEncoder(bundle.path(tokenizer_key), table, text["max_length"], text["pad_token_id"])


def bundle_prompt_encoder(bundle) -> "PromptEncoder | XLPromptEncoder":
    """The bundle's tokenizer and token table, the table checked against what the manifest says;
    for an SDXL bundle both text encoders' (an XLPromptEncoder)."""
    first = _encoder(bundle, "text", "token_embeddings", "tokenizer")
    if bundle.family != "sdxl":
        return first
    m = bundle.manifest
    second = _encoder(bundle, "text_2", "token_embeddings_2", "tokenizer_2")
    text_2 = m["text_2"]
    count = len(m.get("conditioning", {}).get("time_ids", range(6)))
    if count != 6:
        raise UserError(f"{bundle.root}: the SDXL U-Net takes {count} time ids; this runtime knows the base model's 6")
    r = m["resolution"]
    return XLPromptEncoder(first, second, pooled_at=text_2.get("pooled_at", "max_id"),
                           eos_token_id=text_2.get("eos_token_id", 0), time_ids=np.array([r, r, 0, 0, r, r], np.float32))


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

    @property
    def width(self) -> int:
        """Values per token vector (the length of θ)."""
        return int(self.table.shape[1])

    @property
    def parts(self) -> list[tuple["PromptEncoder", slice]]:
        """(prompt encoder, its columns of θ) per token table: here the one, all of θ."""
        return [(self, slice(0, self.width))]

    def init_row(self, word: str) -> np.ndarray:
        """float64 ``[d]``: the table row of the one-token ``word``."""
        return np.asarray(self.table[self.single_token_id(word)], dtype=np.float64)

    def as_row(self, vector, what: str) -> np.ndarray:
        """float64 ``[d]`` from an embedding file's single vector (``[1, d]`` or ``[d]``)."""
        if isinstance(vector, Mapping):
            raise UserError(f"{what} is an SDXL embedding (clip_l and clip_g); this bundle takes one text encoder's")
        row = np.asarray(vector, dtype=np.float64).reshape(-1)
        if row.shape != (self.width,):
            raise UserError(f"{what} has {row.size} values; this bundle's tokens have {self.width}")
        return row

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
        if isinstance(rows, Mapping):
            raise UserError(f"the embedding for {token!r} is an SDXL embedding (clip_l and clip_g); "
                            "this bundle takes one text encoder's")
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


class XLEmbeds(NamedTuple):
    """An SDXL prompt's inputs to both text encoders, ``B`` rows each (one per θ)."""

    first: np.ndarray  # [B, L, d1] for text_encoder
    second: np.ndarray  # [B, L, d2] for text_encoder_2
    eos_index: np.ndarray  # [B] int64: where text_encoder_2 pools

    def rows(self) -> list["XLEmbeds"]:
        return [XLEmbeds(self.first[i : i + 1], self.second[i : i + 1], self.eos_index[i : i + 1]) for i in range(len(self.first))]


class XLPromptEncoder:
    """SDXL's two tokenizers and token tables behind PromptEncoder's interface.

    The learned token is one vector θ of d1 + d2 values (2048 in SDXL: 768 + 1280): its first d1
    go to the token's row in the first table, the rest to its row in the second, so ZO perturbs
    both rows as one parameter. ``embed`` gives an :class:`XLEmbeds`; ``condition`` runs both
    encoders into the U-Net's ``encoder_hidden_states`` (the penultimate hidden states side by
    side, as StableDiffusionXLPipeline concatenates them), ``text_embeds`` (the second encoder's
    pooled, projected output) and ``time_ids``.

    The second encoder pools at the position its manifest's ``pooled_at`` rule gives on the
    prompt's ids, added tokens included: with ``max_id`` (the published config) that is the
    highest id, which is a learned token's when the prompt has one. transformers'
    CLIPTextModelWithProjection does the same, so diffusers sees what training saw.
    """

    def __init__(self, first: PromptEncoder, second: PromptEncoder, *, pooled_at: str, eos_token_id: int,
                 time_ids: np.ndarray):
        self.first, self.second = first, second
        self.pooled_at, self.eos_token_id = pooled_at, eos_token_id
        self.time_ids = np.asarray(time_ids, np.float32)
        self.token: str | None = None

    @property
    def widths(self) -> tuple[int, int]:
        return self.first.width, self.second.width

    @property
    def width(self) -> int:
        return sum(self.widths)

    @property
    def max_length(self) -> int:
        return self.first.max_length

    @property
    def parts(self) -> list[tuple[PromptEncoder, slice]]:
        """(prompt encoder, its columns of θ) per token table: the first's, then the second's."""
        d1 = self.first.width
        return [(self.first, slice(0, d1)), (self.second, slice(d1, self.width))]

    def split(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``[..., d1 + d2]`` -> the first table's part and the second's."""
        d1 = self.first.width
        return rows[..., :d1], rows[..., d1:]

    def init_row(self, word: str) -> np.ndarray:
        """float64 ``[d1 + d2]``: the one-token ``word``'s rows in both tables, side by side."""
        return np.concatenate([self.first.init_row(word), self.second.init_row(word)])

    def as_row(self, vector, what: str) -> np.ndarray:
        """float64 ``[d1 + d2]`` from an SDXL embedding file's single vector pair, or a θ as it is."""
        if not isinstance(vector, Mapping) and np.size(vector) == self.width:
            return np.asarray(vector, np.float64).reshape(-1)
        if not isinstance(vector, Mapping):
            raise UserError(f"{what} is an SD1/SD2 embedding (one text encoder); this SDXL bundle needs clip_l and clip_g")
        parts = [self.first.as_row(vector["clip_l"], f"{what} clip_l"), self.second.as_row(vector["clip_g"], f"{what} clip_g")]
        return np.concatenate(parts)

    def add_token(self, token: str) -> tuple[int, int]:
        ids = self.first.add_token(token), self.second.add_token(token)
        self.token = token
        return ids

    def add_embedding(self, token: str, rows) -> None:
        """A learned token: ``{"clip_l": [k, d1], "clip_g": [k, d2]}`` (an SDXL file) or ``[k, d1 + d2]``."""
        if isinstance(rows, Mapping):
            first, second = rows["clip_l"], rows["clip_g"]
        else:
            rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
            if rows.shape[1] != self.width:
                raise UserError(f"the embedding for {token!r} is one text encoder's ({rows.shape[1]} values per vector); "
                                f"this SDXL bundle needs clip_l and clip_g ({self.widths[0]} + {self.widths[1]})")
            first, second = self.split(rows)
        self.first.add_embedding(token, first)
        self.second.add_embedding(token, second)

    def dropped(self, prompt: str) -> str:
        """What either tokenizer truncates away (the longer of the two)."""
        return max(self.first.dropped(prompt), self.second.dropped(prompt), key=len)

    def eos_index(self, ids: np.ndarray) -> int:
        if self.pooled_at == "max_id":
            return int(ids.argmax())
        return int((ids == self.eos_token_id).argmax())

    def embed(self, prompt: str, thetas: np.ndarray | None = None) -> XLEmbeds:
        """Both encoders' inputs for ``prompt``, the new token's rows set from each θ ``[B, d1 + d2]``."""
        parts = (None, None) if thetas is None else self.split(np.atleast_2d(thetas))
        first, second = self.first.embed(prompt, parts[0]), self.second.embed(prompt, parts[1])
        eos = np.full((len(second),), self.eos_index(self.second.ids(prompt)), np.int64)
        return XLEmbeds(first, second, eos)

    def condition(self, chunks: list[XLEmbeds], run, time_ids: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
        """The U-Net's text conditions for each chunk of rows; ``run(graph, feed, outputs)`` runs one
        graph. Each encoder runs over every chunk before the next, so a profile that loads sessions
        in turn loads each once. ``time_ids``: a training photo's (images.sdxl_time_ids); by default
        the uncropped square at the bundle's resolution."""
        ids = self.time_ids if time_ids is None else np.asarray(time_ids, np.float32)
        c1 = [run("text_encoder", {"inputs_embeds": e.first}, ["penultimate_hidden_state"])[0] for e in chunks]
        c2 = [run("text_encoder_2", {"inputs_embeds": e.second, "eos_index": e.eos_index},
                  ["penultimate_hidden_state", "text_embeds"]) for e in chunks]
        return [{"encoder_hidden_states": np.concatenate([a, b], axis=-1), "text_embeds": pooled,
                 "time_ids": np.repeat(ids[None], len(a), 0)} for a, (b, pooled) in zip(c1, c2)]
