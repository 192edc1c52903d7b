"""Model families and their ZOODiP defaults (the paper's table; docs/algorithm.md, "Defaults")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

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
    search_init: bool = False  # search the start among vocabulary words first (runtime/init_search.py)
    guide_vocab: int = 0  # directions also along the token table's top-k principal directions (runtime/zo.py)
    guide_alpha: float = 0.5  # the full space's share of those directions
    guide_encoder: int = 0  # ... or along the k directions the text encoder responds to most (runtime/sensitivity.py)
    guide_refresh: int = 250  # steps between readings of those directions

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.guide_encoder:  # off: manifests stay as they were before the options existed
            del d["guide_encoder"], d["guide_refresh"]
        if not self.guide_vocab and not self.guide_encoder:
            del d["guide_vocab"], d["guide_alpha"]
        elif not self.guide_vocab:
            del d["guide_vocab"]
        return d


DEFAULTS: dict[str, ZOODefaults] = {
    # SD1.5: the paper writes lr 5e-3, the authors' code uses 1e-2; we follow the code.
    # search_init: on the toy-768 model (CLIP-L's token width) the searched start reached 80% of
    # gradient TI's final concept score in fewer forward passes than TI (docs/steps.md).
    "sd1": ZOODefaults(n=2, mu=1e-3, lr=1e-2, tau=128, nu=1e-3, t_low=500, t_high=900, steps=30_000, search_init=True),
    "sd2": ZOODefaults(n=2, mu=1e-2, lr=1e-2, tau=128, nu=1e-3, t_low=500, t_high=900, steps=30_000, search_init=True),
    "sdxl": ZOODefaults(n=2, mu=1e-2, lr=5e-3, tau=128, nu=1e-3, t_low=700, t_high=900, steps=20_000),
}

# The families an export writes and the runtime runs (SDXL bundles also require the "sdxl" graph
# feature: bundle.FEATURES).
SUPPORTED_FAMILIES = ("sd1", "sd2", "sdxl")


def defaults_for(family: str, overrides: dict | None = None) -> ZOODefaults:
    """The family's defaults, with ``overrides`` (e.g. a small model's own lr and mu) applied."""
    if family not in DEFAULTS:
        raise UserError(f"unknown model family {family!r} (known: {', '.join(DEFAULTS)})")
    d = DEFAULTS[family]
    for key, value in (overrides or {}).items():
        if key not in asdict(d):
            raise UserError(f"unknown default {key!r} (known: {', '.join(asdict(d))})")
        kind = type(getattr(d, key))
        if kind is bool:
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise UserError(f"default {key}={value!r} is not true or false")
            d = replace(d, **{key: text in ("true", "1", "yes")})
            continue
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise UserError(f"default {key}={value!r} is not a {kind.__name__}") from None
        if not (value == value and abs(value) != float("inf")) or value <= 0:
            raise UserError(f"default {key}={value!r} must be a positive finite number")
        if key == "guide_alpha" and value > 1:
            raise UserError(f"default guide_alpha={value!r} must be in (0, 1]")
        d = replace(d, **{key: value})
    return d


def parse_defaults(text: str) -> dict[str, str]:
    """``"lr=2e-2,mu=1e-2"`` -> {"lr": "2e-2", "mu": "1e-2"} (values are typed by defaults_for)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise UserError(f"--defaults wants key=value pairs separated by commas, got {part!r}")
        out[key.strip()] = value.strip()
    return out
