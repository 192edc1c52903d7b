"""The directions in which the U-Net's text conditions respond most to the token: a guiding
basis for the ZO directions (``guide_encoder``, docs/algorithm.md "Guided directions").

The diffusion loss sees the token only through the text encoder's output, so its gradient is
J^T (dL/dc), J the encoder's Jacobian at the token. Whatever the photos, the gradient is large only
along the top right-singular directions of J. J is read with forward differences (d + 1 encoder
passes per prompt, no U-Net pass), at the current token: the directions move as the token does.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def response_jacobian(respond: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float,
                      chunk: int = 64) -> np.ndarray:
    """J^T [d, N] in float32 for ``respond(thetas [b, d]) -> outputs [b, N]``, by forward differences of size ``h``."""
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    d = theta.size
    base = np.asarray(respond(theta[None]), dtype=np.float64)[0]
    # one row per direction (SD1.5: 768 x 77 x 768, about 180 MB, freed before the next step)
    jac = np.empty((d, base.size), dtype=np.float32)
    for i in range(0, d, chunk):
        rows = np.arange(i, min(i + chunk, d))
        thetas = np.repeat(theta[None], len(rows), 0)
        thetas[np.arange(len(rows)), rows] += h
        jac[rows] = (np.asarray(respond(thetas), dtype=np.float64) - base) / h
    return jac


def response_gram(respond: Callable[[np.ndarray], np.ndarray], theta: np.ndarray, h: float,
                  chunk: int = 64) -> np.ndarray:
    """J^T J [d, d] of ``response_jacobian``."""
    jac = response_jacobian(respond, theta, h, chunk)
    # One float32 product: the same top directions as float64 column blocks, 1.8-2.6x faster
    # (benchmarks/experiments/guide_reading_cost.py).
    return (jac @ jac.T).astype(np.float64)


def top_directions(gram: np.ndarray, k: int) -> np.ndarray:
    """The top-``k`` eigenvectors of a symmetric ``gram`` as orthonormal rows [k, d]."""
    _, vectors = np.linalg.eigh(gram)
    return np.ascontiguousarray(vectors[:, ::-1][:, :k].T)


def response_basis(respond: Callable[[str, np.ndarray], np.ndarray], prompts: Iterable[str], theta: np.ndarray,
                   k: int, h: float) -> np.ndarray:
    """The top-``k`` directions of the summed J^T J over ``prompts`` (orthonormal rows [k, d])."""
    gram = sum(response_gram(lambda thetas, p=p: respond(p, thetas), theta, h) for p in prompts)
    return top_directions(gram, k)
