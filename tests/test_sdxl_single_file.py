"""SDXL single-file checkpoints (the original Stability layout) export as the diffusers folder
does: the tiny SDXL pipeline written as one .safetensors loads back to the same weights, exports
to the same bundle, and what cannot work (a refiner, a foreign or corrupt file, a config of the
wrong family) is refused in one line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdxl_single_file import write_original_sdxl
from test_sdxl import sdxl_bundle, sdxl_pipeline  # noqa: F401  (fixtures)

from zoodip_edge.errors import UserError

from cli_checks import refused


@pytest.fixture(scope="session")
def sdxl_single_file(sdxl_pipeline, work):  # noqa: F811
    path = work / "tiny-sdxl.safetensors"
    if not path.exists():
        write_original_sdxl(sdxl_pipeline, path)
    return path


def test_original_layout_loads_back_to_the_same_weights(sdxl_pipeline, sdxl_single_file):  # noqa: F811
    """The test's diffusers->original mapping round-trips through diffusers' own conversion, and
    load_pipeline takes the file as SDXL with the folder as its offline config."""
    from diffusers import StableDiffusionXLPipeline

    from zoodip_edge.export.load import load_pipeline

    keys = load_file(str(sdxl_single_file)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "conditioner"}
    assert any(k.startswith("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight") for k in keys)
    folder = StableDiffusionXLPipeline.from_pretrained(str(sdxl_pipeline))
    p = load_pipeline(str(sdxl_single_file), config=str(sdxl_pipeline))
    assert p.family == "sdxl" and p.force_zeros_for_empty_prompt
    assert p.source["kind"] == "single_file" and p.source["pipeline_class"] == "StableDiffusionXLPipeline"
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        want, got = getattr(folder, name).state_dict(), getattr(p, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name
    assert p.tokenizer_2.pad_token == "!" and p.scheduler_config == dict(folder.scheduler.config)


@pytest.mark.slow
def test_sdxl_single_file_exports_the_same_bundle(sdxl_single_file, sdxl_pipeline, sdxl_bundle, tmp_path):  # noqa: F811
    """Same weights, same export: every graph and table hashes the same as the folder's bundle,
    and the same gates pass; only the source differs."""
    from zoodip_edge.bundle import load_bundle
    from zoodip_edge.cli import app

    from cli_checks import runner

    out = tmp_path / "bundle"
    r = runner.invoke(app, ["export", str(sdxl_single_file), "--config", str(sdxl_pipeline), "--out", str(out)])
    assert r.exit_code == 0, (r.output, r.exception)
    assert "exported sdxl" in r.stdout
    folder_out, want = sdxl_bundle
    got = json.loads((out / "manifest.json").read_text())
    assert load_bundle(out, run=False).family == "sdxl"
    assert got["source"]["kind"] == "single_file" and got["source"]["pipeline_class"] == "StableDiffusionXLPipeline"
    assert {f.name for f in out.iterdir()} == {f.name for f in folder_out.iterdir()}
    for name in ("token_embeddings.safetensors", "token_embeddings_2.safetensors", "tokenizer.json", "tokenizer_2.json"):
        assert (out / name).read_bytes() == (folder_out / name).read_bytes(), name
    assert list(got["components"]) == list(want["components"])
    for name, entry in want["components"].items():
        assert got["components"][name]["sha256"] == entry["sha256"], name
    assert got["verification"] == want["verification"]


def _refiner_like(src, dst):
    """An SDXL refiner's layout: only OpenCLIP, as conditioner.embedders.0.model."""
    state = {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in load_file(str(src)).items()
             if not k.startswith("conditioner.embedders.0.")}
    save_file(state, str(dst))
    return dst


def test_what_cannot_load_is_refused_in_one_line(sdxl_single_file, sdxl_pipeline, sd1_pipeline, tmp_path):  # noqa: F811
    from zoodip_edge.export.load import single_file_family

    models = tmp_path / "models"
    models.mkdir()
    refiner = _refiner_like(sdxl_single_file, models / "refiner.safetensors")
    foreign = models / "embedding.safetensors"
    save_file({"emb_params": torch.zeros(2, 4)}, str(foreign))
    no_vae = models / "no_vae.safetensors"
    save_file({k: v for k, v in load_file(str(sdxl_single_file)).items() if not k.startswith("first_stage_model.")}, str(no_vae))
    garbage = models / "garbage.safetensors"
    garbage.write_bytes(b"\x00\xff" * 64)
    truncated = models / "truncated.safetensors"
    truncated.write_bytes(sdxl_single_file.read_bytes()[: sdxl_single_file.stat().st_size // 2])
    refiner_ckpt = models / "refiner.ckpt"
    torch.save({"state_dict": load_file(str(refiner))}, str(refiner_ckpt))
    pickle_garbage = models / "garbage.ckpt"
    pickle_garbage.write_bytes(b"not a pickle at all")
    out = tmp_path / "bundle"
    cases = [
        (refiner, sdxl_pipeline, "SDXL refiner"),
        (refiner_ckpt, sdxl_pipeline, "SDXL refiner"),
        (pickle_garbage, sdxl_pipeline, "not a readable .ckpt"),
        (foreign, sdxl_pipeline, "no Stable Diffusion U-Net"),
        (no_vae, sdxl_pipeline, "no VAE"),
        (garbage, sdxl_pipeline, "not a readable .safetensors"),
        (truncated, sdxl_pipeline, "truncated download?"),
        (sdxl_single_file, sd1_pipeline, "pass an SDXL base pipeline folder"),
    ]
    for model, config, match in cases:
        refused(["export", model, "--config", config, "--out", out], tmp_path, sdxl_single_file.parent, match=match)
    assert not out.exists()
    with pytest.raises(UserError, match="neither SD"):
        single_file_family("x", ["model.diffusion_model.out.0.weight", "first_stage_model.decoder.conv_in.weight",
                                 "text_encoders.clip_l.weight"])
    assert single_file_family("x", ["model.diffusion_model.a", "first_stage_model.b", "cond_stage_model.c"]) == "sd"
