"""How much memory a personalize run of a bundle needs under a device profile: an estimate,
checked against the profile's ``memory_budget_mb`` before anything loads.

The estimate, in MiB (docs/design.md, "Memory budget")::

    weights      the graphs loaded at once, as stored in the bundle (manifest bytes), plus the
                 token tables (memory-mapped for the whole run; the start search reads them all)
    + 300        Python, NumPy, ONNX Runtime and the photos
    + 450 x A    activations and the allocator's holes at the bundle's resolution, A = latent
                 area / 64 x 64 (SD1.5's 512 px: A = 1; SDXL's 1024 px: A = 4)

Graphs loaded at once: a profile with ``resident_sessions`` keeps the text encoder(s) and the
U-Net loaded together (the VAE encoder runs alone before them and is released); one without
loads every graph alone. A preview (``--preview-every``) adds the VAE decoder to the resident
set (generate releases the U-Net before decoding, but the text encoders stay).

The constants are calibrated on measured SD1.5 int8-cpu peaks; docs/design.md gives the runs and
how close the estimate comes (figures live there, not here). On GPUs the same figure stands for
device memory, not calibrated there.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..bundle import SECOND_TEXT_FILES, Bundle
from ..errors import UserError

__all__ = ["BASE_MB", "ACTIVATION_MB", "MemoryEstimate", "check_memory", "estimate_memory"]

MiB = 2**20
BASE_MB = 300  # Python, NumPy, ONNX Runtime, the photos
ACTIVATION_MB = 450  # per 64 x 64 latent pixels (SD1.5 at 512 px)
TEXT_GRAPHS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's parts in MiB and which graphs it counts as loaded at once."""

    weights_mb: float
    base_mb: float
    activations_mb: float
    graphs: tuple[str, ...]

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.base_mb + self.activations_mb


def _bytes(entry: dict) -> int:
    return int(entry["bytes"]) + sum(int(e["bytes"]) for e in entry.get("external_data", []))


def estimate_memory(bundle: Bundle, resident_sessions: bool, preview: bool = False) -> MemoryEstimate:
    """The resident memory a personalize run of ``bundle`` needs (module docstring)."""
    m = bundle.manifest
    comps = m["components"]
    size = {name: _bytes(entry) for name, entry in comps.items()}
    tables = sum(_bytes(m[k]) for k in ("token_embeddings", SECOND_TEXT_FILES[0]) if k in m)
    text = tuple(g for g in TEXT_GRAPHS if g in comps)
    if resident_sessions:
        phases = [("vae_encoder",), (*text, "unet", *(("vae_decoder",) if preview else ()))]
    else:
        phases = [(g,) for g in ("vae_encoder", *text, "unet", *(("vae_decoder",) if preview else ()))]
    phases = [tuple(g for g in p if g in size) for p in phases]
    graphs = max(phases, key=lambda p: sum(size[g] for g in p))
    area = (int(m["latent_size"]) / 64) ** 2
    return MemoryEstimate(weights_mb=(sum(size[g] for g in graphs) + tables) / MiB, base_mb=BASE_MB,
                          activations_mb=ACTIVATION_MB * area, graphs=graphs)


def check_memory(bundle: Bundle, profile, preview: bool = False) -> MemoryEstimate:
    """Refuse in one line a bundle whose estimate is over ``profile.memory_budget_mb``
    (a profile without a budget never refuses). Returns the estimate."""
    est = estimate_memory(bundle, profile.resident_sessions, preview)
    budget = profile.memory_budget_mb
    if budget is not None and est.total_mb > budget:
        m = bundle.manifest
        loaded = " + ".join(est.graphs) + (" loaded at once" if len(est.graphs) > 1 else " alone")
        raise UserError(
            f"this {m['family']} {m['recipe']['name']} bundle needs an estimated {est.total_mb:,.0f} MB to personalize "
            f"with device profile {profile.name!r} ({est.weights_mb:,.0f} MB of weights, {loaded}, + "
            f"{est.base_mb + est.activations_mb:,.0f} MB for the runtime and activations at {m['resolution']} px"
            f"{', with the preview decoder' if preview else ''}), over its memory_budget_mb of {budget:,}; "
            "use a profile whose budget fits (a profile file may set a larger memory_budget_mb, or none) "
            "or a bundle of a smaller recipe")
    return est
