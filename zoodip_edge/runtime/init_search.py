"""A better start for the token, found with forward passes only.

Every candidate vocabulary token is scored by the diffusion loss it gives on the reference
photos, over a fixed set of (t, noise) probes; then the mean of the best two and of the best
three, rescaled to their members' mean norm (tokens that drift far from real tokens' norms
were reported to slow textual inversion down), are scored the same way. The best of all wins.
Candidates are ranked on a few probes first and the best few on all of them (successive
halving); ``SearchResult.forwards`` counts the forward passes spent.

SDXL: θ is the token's row in each of the two tables side by side, so a candidate is a whole
word both tokenizers know (SDXL's share CLIP's BPE vocabulary), its θ its row in each table, and a
mix is rescaled table by table (each table's rows have their own norms).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

WORD = re.compile(r"^[a-z]{2,}</w>$")  # a whole lower-case word in CLIP's BPE vocabulary


@dataclass
class SearchResult:
    theta: np.ndarray
    label: str  # the winning token, or "a + b (+ c)"
    loss: float
    forwards: int  # forward passes (one text encoder + U-Net evaluation each) spent
    ranking: list[tuple[str, float]] = field(default_factory=list)  # the best few, loss ascending


def search_probes(t_low: int, t_high: int) -> list[tuple[int, int]]:
    """32 fixed (t, noise seed) probes over the training range; the first 8 rank every candidate."""
    from .stopping import probe_set

    return probe_set(t_low, t_high, 32, 9000)


Ids = int | tuple[int, ...]  # a word's id, or (SDXL) its id in each tokenizer


def _whole_words(enc) -> dict[str, int]:
    vocab = enc.tok.get_vocab(with_added_tokens=False)
    return {w.removesuffix("</w>"): i for w, i in vocab.items() if WORD.match(w) and i < enc.table.shape[0]}


def candidate_rows(text, ids: Sequence[Ids]) -> np.ndarray:
    """θ of each candidate: its row in every table, side by side."""
    parts = text.parts
    per = [i if isinstance(i, tuple) else (i,) for i in ids]
    return np.concatenate([np.asarray(enc.table[[i[k] for i in per]], dtype=np.float64).reshape(len(per), -1)
                           for k, (enc, _) in enumerate(parts)], axis=1)


def word_candidates(p, limit: int = 256) -> list[tuple[str, Ids]]:
    """(word, id) of the vocabulary's whole words (SDXL: those both tokenizers know, with their
    id in each): all of them when there are at most ``limit`` (a small model), else the ``limit``
    nearest to the initializer by cosine, averaged over the tables (SD's 49,408-token vocabulary
    would cost hundreds of thousands of forward passes)."""
    parts = p.text.parts
    maps = [_whole_words(enc) for enc, _ in parts]
    common = sorted(set(maps[0]).intersection(*maps[1:]), key=lambda w: (maps[0][w], w))
    ids: list[Ids] = [maps[0][w] if len(maps) == 1 else tuple(m[w] for m in maps) for w in common]
    if len(common) <= limit:
        return list(zip(common, ids))
    rows = candidate_rows(p.text, ids)
    start = np.asarray(p.theta0, dtype=np.float64)
    cos = np.zeros(len(rows))
    for _, cols in parts:
        r, s = rows[:, cols], start[cols]
        cos += r @ s / np.maximum(np.linalg.norm(r, axis=1) * np.linalg.norm(s), 1e-12) / len(parts)
    keep = np.sort(np.argsort(-cos)[:limit])
    return [(common[k], ids[k]) for k in keep]


def search_initializer(p, probes: Sequence[tuple[int, int]], candidates: Sequence[tuple[str, Ids]] | None = None,
                       first: int = 8, finalists: int = 8, batch: int = 32, mixes: int = 3) -> SearchResult:
    """The vocabulary token (or mix of the best few) with the lowest mean loss over ``probes``.

    ``p`` is a Personalizer (its sessions, photos and prompt draws); ``probes`` are fixed
    (t, noise seed) pairs, the same for every candidate (common random numbers). Successive
    halving: every candidate on the ``first`` probes, the best ``finalists`` on all of them (one
    probe's loss is too noisy to rank tokens by), then the mixes on all of them.
    """
    candidates = list(candidates) if candidates is not None else word_candidates(p)
    rows = candidate_rows(p.text, [i for _, i in candidates])
    labels = [w for w, _ in candidates]
    head, rest = list(probes[:first]), list(probes[first:])
    first_losses = _mean_losses(p, rows, head, batch)
    forwards = len(rows) * len(head)
    keep = np.argsort(first_losses)[:finalists]
    rows, labels = rows[keep], [labels[i] for i in keep]
    losses = first_losses[keep]
    if rest:
        losses = (losses * len(head) + _mean_losses(p, rows, rest, batch) * len(rest)) / len(probes)
        forwards += len(rows) * len(rest)
    order = np.argsort(losses)
    mixed_rows, mixed_labels = [], []
    for k in range(2, min(mixes, len(rows)) + 1):
        members = rows[order[:k]]
        mix = members.mean(axis=0)
        for _, cols in p.text.parts:  # each table's part to its members' mean norm there
            mix[cols] *= np.linalg.norm(members[:, cols], axis=1).mean() / max(np.linalg.norm(mix[cols]), 1e-12)
        mixed_rows.append(mix)
        mixed_labels.append(" + ".join(labels[i] for i in order[:k]))
    if mixed_rows:
        rows = np.concatenate([rows, np.asarray(mixed_rows)])
        labels += mixed_labels
        losses = np.concatenate([losses, _mean_losses(p, np.asarray(mixed_rows), probes, batch)])
        forwards += len(mixed_rows) * len(probes)
    best = int(np.argmin(losses))
    ranking = [(labels[i], float(losses[i])) for i in np.argsort(losses)]
    return SearchResult(rows[best].copy(), labels[best], float(losses[best]), forwards, ranking)


def _mean_losses(p, rows: np.ndarray, probes: Sequence[tuple[int, int]], batch: int) -> np.ndarray:
    out = np.zeros(len(rows))
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        out[start:start + len(chunk)] = np.mean([p.losses(chunk, t, s) for t, s in probes], axis=0)
    return out
