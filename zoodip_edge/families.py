"""Model families and their ZOODiP defaults (the paper's table, ../shared/ALGORITHM.md)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import UserError


@dataclass(frozen=True)
class ZOODefaults:
    n: int  # perturbations per step
    mu: float  # perturbation size
    lr: float  # ZOAdam learning rate (the authors' code)
    tau: int  # Subspace Gradient buffer length
    nu: float  # Subspace Gradient variance threshold
    t_low: int  # PUTS lower bound (inclusive)
    t_high: int  # PUTS upper bound (exclusive)
    steps: int  # iterations the paper ran

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULTS: dict[str, ZOODefaults] = {
    # SD1.5: the paper writes lr 5e-3, the authors' code uses 1e-2; we follow the code.
    "sd1": ZOODefaults(n=2, mu=1e-3, lr=1e-2, tau=128, nu=1e-3, t_low=500, t_high=900, steps=30_000),
    "sd2": ZOODefaults(n=2, mu=1e-2, lr=1e-2, tau=128, nu=1e-3, t_low=500, t_high=900, steps=30_000),
    "sdxl": ZOODefaults(n=2, mu=1e-2, lr=5e-3, tau=128, nu=1e-3, t_low=700, t_high=900, steps=20_000),
}

SUPPORTED_FAMILIES = ("sd1", "sd2")


def defaults_for(family: str) -> ZOODefaults:
    if family not in DEFAULTS:
        raise UserError(f"unknown model family {family!r} (known: {', '.join(DEFAULTS)})")
    return DEFAULTS[family]
