"""The memory estimate of a personalize run (runtime/memory.py) and the profile budget it is
checked against: which graphs count as loaded at once, the formula's terms, the one-line refusal,
and the figures docs/design.md gives for SD1.5 and SDXL."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from zoodip_edge.bundle import load_bundle
from zoodip_edge.errors import UserError
from zoodip_edge.profiles import resolve_profile
from zoodip_edge.runtime.memory import ACTIVATION_MB, BASE_MB, check_memory, estimate_memory

from cli_checks import ok, personalize_args, refused

MiB = 2**20


def profile_file(tmp_path: Path, budget: int | None, name: str = "tight") -> Path:
    """The cpu profile's settings with ``budget`` (None: no memory_budget_mb line)."""
    text = (Path(__file__).resolve().parent.parent / "devices" / "cpu.toml").read_text()
    lines = [line for line in text.splitlines() if not line.startswith("memory_budget_mb")]
    lines[lines.index('name = "cpu"')] = f'name = "{name}"'  # the profile's, not its provider's
    if budget is not None:
        lines.insert(1, f"memory_budget_mb = {budget}")
    path = tmp_path / f"{name}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def fake_bundle(sizes: dict[str, float], tables: float, latent: int, family: str = "sdxl") -> SimpleNamespace:
    """A manifest with only what the estimate reads (sizes in bytes)."""
    comps = {name: {"bytes": int(b)} for name, b in sizes.items()}
    m = {"components": comps, "token_embeddings": {"bytes": int(tables)}, "latent_size": latent,
         "resolution": 8 * latent, "family": family, "recipe": {"name": "int8-cpu"}}
    return SimpleNamespace(manifest=m)


def test_estimate_counts_the_graphs_loaded_at_once(sd1_bundle):
    """Resident sessions: text encoder + U-Net (the VAE encoder runs alone first); a preview adds
    the VAE decoder. Sessions in turn: the largest graph alone. Plus the token table, 300 MB and
    450 MB per 64 x 64 latent pixels."""
    b = load_bundle(sd1_bundle)
    m = b.manifest
    size = {k: c["bytes"] for k, c in m["components"].items()}
    table = m["token_embeddings"]["bytes"]
    area = (m["latent_size"] / 64) ** 2
    est = estimate_memory(b, resident_sessions=True)
    assert est.graphs == ("text_encoder", "unet")
    assert est.weights_mb == pytest.approx((size["text_encoder"] + size["unet"] + table) / MiB)
    assert est.base_mb == BASE_MB and est.activations_mb == pytest.approx(ACTIVATION_MB * area)
    assert est.total_mb == pytest.approx(est.weights_mb + BASE_MB + ACTIVATION_MB * area)
    assert estimate_memory(b, True, preview=True).graphs == ("text_encoder", "unet", "vae_decoder")
    alone = estimate_memory(b, resident_sessions=False)
    assert alone.graphs == (max(("vae_encoder", "text_encoder", "unet"), key=size.get),)
    assert alone.total_mb < est.total_mb


def test_sd15_int8_cpu_estimate_is_the_documented_calibration():
    """SD1.5 int8-cpu as exported (docs/performance.md: text encoder 96 MB, U-Net 894 MB, VAE 85 MB;
    the fp16 token table 49408 x 768): 1,767 MiB at 512 px, over every measured peak at 256 and 512 px."""
    b = fake_bundle({"text_encoder": 96e6, "unet": 894e6, "vae_encoder": 34e6, "vae_decoder": 50e6},
                    49408 * 768 * 2, 64, family="sd1")
    assert round(estimate_memory(b, True).weights_mb) == 1017
    for latent, want, measured_max in ((32, 1429, 1341), (64, 1767, 1715), (96, 2329, 2403)):
        b.manifest["latent_size"] = latent
        assert round(estimate_memory(b, True).total_mb) == want
        assert (want >= measured_max) == (latent < 96)  # 768 px: the two documented runs over it


def test_full_size_sdxl_int8_cpu_estimate_is_the_documented_one():
    """docs/design.md's SDXL figure, from parameter counts (an estimate, not a measurement): U-Net
    2.567 B at SD1.5 int8-cpu's 1.09 bytes per parameter, the text encoders without their token
    tables (CLIP-L 85 M, bigG 631 M) at its text encoder's 1.18, both fp16 tables, 1024 px."""
    b = fake_bundle({"text_encoder": 85e6 * 1.18, "text_encoder_2": 631e6 * 1.18, "unet": 2.567e9 * 1.09,
                     "vae_encoder": 34e6 * 1.09, "vae_decoder": 50e6 * 1.09}, 49408 * 768 * 2, 128)
    b.manifest["token_embeddings_2"] = {"bytes": 49408 * 1280 * 2}
    resident, alone = estimate_memory(b, True), estimate_memory(b, False)
    assert resident.graphs == ("text_encoder", "text_encoder_2", "unet")
    assert (round(resident.weights_mb), round(resident.total_mb), round(alone.total_mb)) == (3667, 5767, 4961)
    for name, fits in (("cpu", True), ("cpu-lowmem", True), ("jetson-orin-nano", True), ("cuda-lowvram", False)):
        profile = resolve_profile(name)
        assert (estimate_memory(b, profile.resident_sessions).total_mb <= profile.memory_budget_mb) == fits, name


def test_check_memory_refuses_over_the_budget_only(sd1_bundle):
    b = load_bundle(sd1_bundle)
    cpu = resolve_profile("cpu")
    est = check_memory(b, cpu)
    assert check_memory(b, dataclasses.replace(cpu, memory_budget_mb=None)) == est
    assert check_memory(b, dataclasses.replace(cpu, memory_budget_mb=int(est.total_mb) + 1)) == est
    with pytest.raises(UserError) as e:
        check_memory(b, dataclasses.replace(cpu, memory_budget_mb=int(est.total_mb)))
    msg = str(e.value)
    assert "\n" not in msg and f"over its memory_budget_mb of {int(est.total_mb):,}" in msg
    assert "text_encoder + unet loaded at once" in msg and "use a profile whose budget fits" in msg


def test_personalize_refuses_a_bundle_over_the_budget_in_one_line(sd1_bundle, photos, tmp_path):
    """Exit 2, one line naming the estimate and the budget, nothing written (no embedding,
    checkpoint or log); the same run under a profile without a budget trains."""
    out = tmp_path / "out" / "learned.safetensors"
    out.parent.mkdir()
    tight = profile_file(tmp_path, 64)
    args = personalize_args(sd1_bundle, photos, out, "--steps", "1", "--log-jsonl", out.with_suffix(".jsonl"))
    line = refused([*args, "--device", tight], sd1_bundle, photos, out.parent,
                   match="needs an estimated")
    assert "device profile 'tight'" in line and "over its memory_budget_mb of 64;" in line
    ok([*args, "--device", profile_file(tmp_path, None, "unbounded")])
    assert out.is_file() and json.loads(out.with_suffix(".jsonl").read_text().splitlines()[0])["type"] == "start"


def test_preview_counts_the_decoder(sd1_bundle, photos, tmp_path):
    """A budget between the estimates without and with the preview decoder: refused only with
    --preview-every, before any step or file."""
    from zoodip_edge.runtime.personalize import Personalizer

    b = load_bundle(sd1_bundle)
    cpu = resolve_profile("cpu")
    plain, preview = estimate_memory(b, True), estimate_memory(b, True, preview=True)
    budget = (plain.total_mb + preview.total_mb) / 2  # the tiny decoder is under 1 MB: between two whole MB
    p = Personalizer(b, photos, "<ball>", "dog", profile=dataclasses.replace(cpu, memory_budget_mb=budget))
    with pytest.raises(UserError, match="with the preview decoder"):
        p.train(1, preview_every=1, checkpoint=tmp_path / "c.ckpt", out=tmp_path / "e.safetensors")
    assert p.step_index == 0 and not list(tmp_path.iterdir())
