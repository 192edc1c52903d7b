"""How much memory a personalize or generate run of a bundle needs under a device profile: an estimate,
checked against the profile's ``memory_budget_mb`` before anything loads.

The estimate, in MiB (docs/design.md, "Memory budget")::

    weights      the graphs loaded at once, as stored in the bundle (manifest bytes), plus the
                 token tables (memory-mapped for the whole run; the start search reads them all)
    + 300        Python, NumPy, ONNX Runtime and the photos
    + 450 x A    activations and the allocator's holes at the bundle's resolution, A = latent
                 area / 64 x 64 (SD1.5's 512 px: A = 1; SDXL's 1024 px: A = 4); for SDXL bundles
                 800 + 220 x A, or 2,500 x A for those exported before weights-first
                 (``unet_activations_mb``)

With ``guide_encoder`` a reading (zoodip_edge/runtime/sensitivity.py) holds the text encoder's
Jacobian, d x (max_length x hidden) float32 values (SD1.5: 173 MiB), while the same graphs are
loaded and no U-Net step runs: a phase of its own, which needs more than a step only at small
resolutions.

Graphs loaded at once: a profile with ``resident_sessions`` keeps the text encoder(s) and the
U-Net loaded together (the VAE encoder runs alone before them and is released); one without
loads every graph alone. A preview (``--preview-every``) adds the VAE decoder to the resident
set (generate releases the U-Net before decoding, but the text encoders stay).

The constants are calibrated on measured SD1.5 int8-cpu peaks, SDXL's on SDXL-architecture runs
at 512 to 1024 px; docs/design.md gives the runs and
how close the estimate comes (figures live there, not here). On GPUs the same figure stands for
device memory, not calibrated there.

``generate`` (``estimate_generation_memory``) has two phases and needs the larger: sampling (the
text encoder(s) and U-Net as above, none of the VAE encoder) and decoding, where the U-Net is
released and the VAE decoder runs, with the text encoder(s) if sessions are resident. The
decoder's activations are ``DECODER_MB x A``, A the latent area decoded at once / 64 x 64: one
image's latent, or one tile's with ``--tile`` (tiles are decoded one at a time; the float64
image they are blended into, 32 MiB at 1024 px, is left out).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from ..bundle import SECOND_TEXT_FILES, Bundle
from ..errors import UserError

if TYPE_CHECKING:
    from ..profiles import DeviceProfile

__all__ = ["BASE_MB", "ACTIVATION_MB", "SDXL_ACTIVATION_MB", "SDXL_WEIGHTS_FIRST_FIXED_MB", "SDXL_WEIGHTS_FIRST_MB", "DECODER_MB", "unet_activations_mb", "MemoryEstimate", "check_memory",
           "check_generation_memory", "decoder_activations_mb", "estimate_generation_memory", "estimate_memory", "guide_reading_mb"]

MiB = 2**20
BASE_MB = 300  # Python, NumPy, ONNX Runtime, the photos
ACTIVATION_MB = 450  # per 64 x 64 latent pixels (SD1.5 at 512 px)
# SDXL bundles exported before weights-first (bundle.FEATURES): ONNX Runtime dequantized the U-Net's
# weights long before their use and held 2.3 GB of them at once; personalize peaks at 512 px were
# 2.0-2.1 GB over the weights + 300 MB.
SDXL_ACTIVATION_MB = 2500
# With weights-first, 800 + 220 x A: the batched cpu step peaked 999 / 505 / 1,653 MiB over the
# weights + 300 at 512 / 768 / 1024 px (one by one less); the 512 px run holds more than its area
# says (not traced). docs/design.md gives the runs.
SDXL_WEIGHTS_FIRST_FIXED_MB = 800
SDXL_WEIGHTS_FIRST_MB = 220
# The VAE decoder works at full image size, so its activations are its own term (calibrated on
# SD1.5's decoder, which SDXL's shares; docs/design.md gives the runs).
DECODER_MB = 1350  # per 64 x 64 latent pixels decoded at once
TEXT_GRAPHS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate's parts in MiB, which graphs it counts as loaded at once, and the phase of the
    run it is for (personalize: ``encode``, ``step``, ``reading``; generate: ``sampling``, ``decoding``)."""

    weights_mb: float
    base_mb: float
    activations_mb: float
    graphs: tuple[str, ...]
    phase: str = "step"

    @property
    def total_mb(self) -> float:
        return self.weights_mb + self.base_mb + self.activations_mb


def _bytes(entry: dict) -> int:
    return int(entry["bytes"]) + sum(int(e["bytes"]) for e in entry.get("external_data", []))


def _text_graphs(bundle: Bundle) -> tuple[str, ...]:
    return tuple(g for g in TEXT_GRAPHS if g in bundle.manifest["components"])


def _largest(bundle: Bundle, phases: list[tuple[str, tuple[str, ...], float]]) -> MemoryEstimate:
    """The estimate of the phase that needs the most: each phase is (its name, graphs loaded at
    once, their activations in MiB); every phase also holds the token tables and BASE_MB."""
    m = bundle.manifest
    size = {name: _bytes(entry) for name, entry in m["components"].items()}
    tables = sum(_bytes(m[k]) for k in ("token_embeddings", SECOND_TEXT_FILES[0]) if k in m)
    estimates = []
    for phase, graphs, activations in phases:
        graphs = tuple(g for g in graphs if g in size)
        estimates.append(MemoryEstimate(weights_mb=(sum(size[g] for g in graphs) + tables) / MiB, base_mb=BASE_MB,
                                        activations_mb=activations, graphs=graphs, phase=phase))
    return max(estimates, key=lambda e: e.total_mb)  # the first of equals, as the phases are listed


def estimate_memory(bundle: Bundle, resident_sessions: bool, preview: bool = False,
                    guide_encoder: int = 0) -> MemoryEstimate:
    """The resident memory a personalize run of ``bundle`` needs (module docstring)."""
    text = _text_graphs(bundle)
    decoder = ("vae_decoder",) if preview else ()
    activations = unet_activations_mb(bundle)
    if resident_sessions:
        phases = [("encode", ("vae_encoder",), activations), ("step", (*text, "unet", *decoder), activations)]
    else:
        phases = [("encode" if g == "vae_encoder" else "step", (g,), activations) for g in ("vae_encoder", *text, "unet", *decoder)]
    if guide_encoder:
        phases.append(("reading", (*text, "unet", *decoder) if resident_sessions else text, guide_reading_mb(bundle)))
    return _largest(bundle, phases)


def guide_reading_mb(bundle: Bundle) -> float:
    """The text encoder's float32 Jacobian that a ``guide_encoder`` reading holds, in MiB."""
    text = bundle.manifest["text"]
    return bundle.manifest["token_embeddings"]["shape"][1] * text["max_length"] * text["hidden_size"] * 4 / MiB


def unet_activations_mb(bundle: Bundle) -> float:
    """The U-Net step's activations (and allocator holes), in MiB, at the bundle's latent size."""
    area = (int(bundle.manifest["latent_size"]) / 64) ** 2
    if bundle.manifest.get("family") != "sdxl":
        return ACTIVATION_MB * area
    if "weights_first" in bundle.manifest["recipe"].get("graphs", {}).get("unet", {}):
        return SDXL_WEIGHTS_FIRST_FIXED_MB + SDXL_WEIGHTS_FIRST_MB * area
    return SDXL_ACTIVATION_MB * area


def decoder_activations_mb(latent: int) -> float:
    """The VAE decoder's activations, in MiB, decoding a ``latent`` x ``latent`` latent at once."""
    return DECODER_MB * (latent / 64) ** 2


def estimate_generation_memory(bundle: Bundle, resident_sessions: bool, tile: int | None = None) -> MemoryEstimate:
    """The resident memory ``generate`` needs (module docstring): the larger of sampling and
    decoding, the latter one image at a time, or one ``tile`` (latent pixels) at a time."""
    text = _text_graphs(bundle)
    latent = int(bundle.manifest["latent_size"])
    sampling = unet_activations_mb(bundle)
    decoding = decoder_activations_mb(min(tile, latent) if tile else latent)
    if resident_sessions:
        phases = [("sampling", (*text, "unet"), sampling), ("decoding", (*text, "vae_decoder"), decoding)]
    else:
        phases = [*(("sampling", (g,), sampling) for g in (*text, "unet")), ("decoding", ("vae_decoder",), decoding)]
    return _largest(bundle, phases)


def _refuse(bundle: Bundle, profile: DeviceProfile, est: MemoryEstimate, doing: str, detail: str, hint: str) -> NoReturn:
    """One line: the estimate, its parts and the budget it is over, and what to change."""
    m = bundle.manifest
    loaded = " + ".join(est.graphs) + (" loaded at once" if len(est.graphs) > 1 else " alone")
    raise UserError(
        f"this {m['family']} {m['recipe']['name']} bundle needs an estimated {est.total_mb:,.0f} MB to {doing} "
        f"with device profile {profile.name!r} ({est.weights_mb:,.0f} MB of weights, {loaded}, + "
        f"{est.base_mb + est.activations_mb:,.0f} MB for the runtime and activations at {m['resolution']} px"
        f"{detail}), over its memory_budget_mb of {profile.memory_budget_mb:,}; "
        f"use a profile whose budget fits (a profile file may set a larger memory_budget_mb, or none){hint} "
        "or a bundle of a smaller recipe")


def check_memory(bundle: Bundle, profile: DeviceProfile, preview: bool = False, guide_encoder: int = 0) -> MemoryEstimate:
    """Refuse in one line a bundle whose estimate is over ``profile.memory_budget_mb``
    (a profile without a budget never refuses). Returns the estimate."""
    est = estimate_memory(bundle, profile.resident_sessions, preview, guide_encoder)
    budget = profile.memory_budget_mb
    if budget is not None and est.total_mb > budget:
        reading = ", reading the text encoder's response (guide_encoder)" if est.phase == "reading" else ""
        _refuse(bundle, profile, est, "personalize", (", with the preview decoder" if preview else "") + reading, "")
    return est


def check_generation_memory(bundle: Bundle, profile: DeviceProfile, tile: int | None = None) -> MemoryEstimate:
    """``check_memory`` for ``generate``, decoding in tiles of ``tile`` latent pixels (None: whole)."""
    est = estimate_generation_memory(bundle, profile.resident_sessions, tile)
    budget = profile.memory_budget_mb
    if budget is not None and est.total_mb > budget:
        decoding = est.phase == "decoding"
        tiled = tile is not None and tile < int(bundle.manifest["latent_size"])
        detail = f", the VAE decoder in tiles of {tile} latent pixels" if tiled else ""
        hint = (", a smaller --tile" if tiled else ", --tile to decode in tiles") if decoding else ""
        _refuse(bundle, profile, est, "generate", detail, hint)
    return est
