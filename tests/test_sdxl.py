"""SDXL export on a tiny random-weight StableDiffusionXLPipeline: graphs, manifest, gates, and the
runtime reading SDXL bundles (inspect) but refusing to run them in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from zoodip_edge.bundle import FEATURES, load_bundle
from zoodip_edge.cli import app
from zoodip_edge.errors import UserError

from cli_checks import TOKEN, ok, personalize_args, refused, runner
from conftest import run_cli_without_torch

REFUSAL = "SDXL bundles can be exported and inspected; personalize and generate do not support them yet"


@pytest.fixture(scope="session")
def sdxl_pipeline(work):
    from zoodip_edge.export.tiny import build_tiny_sdxl_pipeline

    out = work / "tiny-sdxl"
    if not out.exists():
        build_tiny_sdxl_pipeline(out, seed=0)
    return out


_exports: dict = {}


def sdxl_export(pipeline, work, recipe: str):
    if recipe not in _exports:
        from zoodip_edge.export import export_bundle

        out = work / f"bundle-tiny-sdxl-{recipe}"
        _exports[recipe] = (out, export_bundle(str(pipeline), out, recipe=recipe))
    return _exports[recipe]


@pytest.fixture(scope="session")
def sdxl_bundle(sdxl_pipeline, work):
    """The tiny SDXL pipeline exported with the default recipe (int8-cpu): (folder, manifest)."""
    return sdxl_export(sdxl_pipeline, work, "int8-cpu")


# ------------------------------------------------------------------ the wrappers, in torch --

@pytest.mark.parametrize("eos_token_id", [2, 9])
def test_second_text_encoder_from_embeddings_is_clip_with_projection(eos_token_id):
    """Fed the looked-up embeddings and the position CLIP pools at, the wrapper gives
    CLIPTextModelWithProjection's hidden states (penultimate as SDXL reads it) and text_embeds, for
    either pooling rule (published configs say eos_token_id 2: the highest id; others: the first EOS)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from zoodip_edge.export.graphs import TextEncoderWithProjectionFromEmbeddings
    from zoodip_edge.export.verify_sdxl import eos_index

    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                         max_position_embeddings=8, hidden_act="gelu", eos_token_id=eos_token_id, projection_dim=8)
    model = CLIPTextModelWithProjection(cfg).eval()
    ids = torch.tensor([[8, 3, 4, 9, 0, 0, 0, 0], [8, 5, 9, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        ref = model(ids, output_hidden_states=True)
        rule = "max_id" if eos_token_id == 2 else "first_eos"
        eos = torch.from_numpy(eos_index(ids.numpy(), rule, 9))
        last, penultimate, pooled = TextEncoderWithProjectionFromEmbeddings(model)(model.get_input_embeddings()(ids), eos)
    assert eos.tolist() == [3, 2]
    torch.testing.assert_close(last, ref.last_hidden_state)
    torch.testing.assert_close(penultimate, ref.hidden_states[-2])
    torch.testing.assert_close(pooled, ref.text_embeds)


def test_sdxl_feature_is_known_and_not_run():
    f = FEATURES["sdxl"]
    assert f.families == ("sdxl",) and f.unsupported == REFUSAL and f.key == "added_conditions"


# ------------------------------------------------------------------ the export --------------

@pytest.mark.slow
def test_sdxl_export_manifest(sdxl_bundle):
    out, m = sdxl_bundle
    b = load_bundle(out, run=False)  # every hash verifies, the second table and tokenizer too
    assert b.family == "sdxl" and m["source"]["pipeline_class"] == "StableDiffusionXLPipeline"
    assert m["requires"][-1] == "sdxl" and m["recipe"]["graphs"]["unet"]["added_conditions"] == 2
    assert m["latent_scale"] == pytest.approx(0.13025)
    assert list(m["components"]) == ["text_encoder", "text_encoder_2", "unet", "vae_encoder", "vae_decoder"]
    assert {e["path"] for e in b.files()} >= {"token_embeddings_2.safetensors", "tokenizer_2.json"}
    t1, t2 = m["text"], m["text_2"]
    assert (t1["hidden_size"], t2["hidden_size"], t2["projection_dim"]) == (32, 64, 32)
    assert t1["max_length"] == t2["max_length"] == 77
    assert t2["pooled_at"] == "max_id" and t2["pad_token_id"] == 0 != t1["pad_token_id"]  # tokenizer_2 pads with "!"
    assert m["token_embeddings_2"]["shape"] == [t2["vocab_size"], 64]
    assert m["conditioning"]["encoder_hidden_states"] == ["text_encoder.penultimate_hidden_state",
                                                          "text_encoder_2.penultimate_hidden_state"]
    assert m["conditioning"]["text_embeds"] == "text_encoder_2.text_embeds" and len(m["conditioning"]["time_ids"]) == 6
    assert m["defaults"]["t_low"] == 700 and m["defaults"]["lr"] == 5e-3  # the family's
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(out / "tokenizer_2.json")).encode("a photo of a dog").ids
    assert len(ids) == 77 and ids[-1] == 0


@pytest.mark.slow
def test_sdxl_graph_inputs(sdxl_bundle):
    import onnxruntime as ort

    out, m = sdxl_bundle
    want = {
        "text_encoder": {"inputs_embeds": ["batch", 77, 32]},
        "text_encoder_2": {"inputs_embeds": ["batch", 77, 64], "eos_index": ["batch"]},
        "unet": {"sample": ["sample_batch", 4, 8, 8], "timestep": ["sample_batch"],  # shared prefix (int8-cpu)
                 "encoder_hidden_states": ["batch", 77, 96], "text_embeds": ["batch", 32], "time_ids": ["batch", 6]},
    }
    for graph, inputs in want.items():
        assert {i["name"]: i["shape"] for i in m["components"][graph]["inputs"]} == inputs
        sess = ort.InferenceSession(str(out / m["components"][graph]["path"]), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == list(inputs)
    outputs = {g: [o["name"] for o in m["components"][g]["outputs"]] for g in ("text_encoder", "text_encoder_2")}
    assert outputs["text_encoder_2"] == ["last_hidden_state", "penultimate_hidden_state", "text_embeds"]
    assert outputs["text_encoder"] == ["last_hidden_state", "penultimate_hidden_state"]


@pytest.mark.slow
def test_sdxl_gates(sdxl_bundle):
    _, m = sdxl_bundle
    v = m["verification"]
    for graph in m["components"]:
        for err in v["parity"][graph].values():
            assert err["rel"] <= v["parity_tolerance"]
    assert set(v["text_encoder_2_parity"]["outputs"]) == {"last_hidden_state", "penultimate_hidden_state", "text_embeds"}
    assert v["text_encoder_parity"]["rel"] < 0.05 and v["text_encoder_2_parity"]["rel"] < 0.05
    assert v["conditioning_sensitivity"]["passed"] and v["conditioning_sensitivity"]["ratio"] >= 0.9
    f = v["zo_fidelity"]
    assert f["passed"] and f["pearson"] >= 0.95 and f["widths"] == [32, 64] and f["width"] == 96
    assert f["step_norm"] == pytest.approx(m["defaults"]["mu"] * 96 ** 0.5) and len(f["probes"]) == 3


@pytest.mark.slow
def test_sdxl_fp32_matches_transformers(sdxl_pipeline, work):
    """fp32: the embedding-fed encoders are CLIPTextModel / CLIPTextModelWithProjection fed with
    input ids (pooled output included), and the U-Net with added conditions is diffusers'."""
    _, m = sdxl_export(sdxl_pipeline, work, "fp32")
    v = m["verification"]
    assert v["text_encoder_parity"]["max_abs"] <= 1e-4 and v["text_encoder_2_parity"]["max_abs"] <= 1e-4
    assert v["text_encoder_2_parity"]["outputs"]["text_embeds"]["max_abs"] <= 1e-4
    assert v["parity"]["unet"]["out_sample"]["rel"] <= 1e-4
    assert v["conditioning_sensitivity"]["ratio"] == pytest.approx(1, abs=1e-3) and v["zo_fidelity"]["pearson"] > 0.99


@pytest.mark.slow
def test_sdxl_shared_prefix_serves_a_batch_of_conditions(sdxl_bundle):
    """The int8-cpu U-Net takes one sample row for B conditions; the added conditions (the pooled
    text changes with the token) are per row, so this equals B identical sample rows."""
    import onnxruntime as ort

    out, m = sdxl_bundle
    from zoodip_edge.recipes import RECIPES

    so = ort.SessionOptions()
    for k, val in RECIPES["int8-cpu"].session_config.items():
        so.add_session_config_entry(k, val)
    unet = ort.InferenceSession(str(out / m["components"]["unet"]["path"]), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, 8, 8)).astype(np.float32)
    feed = {"encoder_hidden_states": rng.standard_normal((3, 77, 96)).astype(np.float32),
            "text_embeds": rng.standard_normal((3, 32)).astype(np.float32),
            "time_ids": np.tile(np.array([[64, 64, 0, 0, 64, 64]], np.float32), (3, 1))}
    one = unet.run(None, {"sample": z, "timestep": np.array([700], np.float32), **feed})[0]
    each = unet.run(None, {"sample": np.repeat(z, 3, 0), "timestep": np.full((3,), 700, np.float32), **feed})[0]
    np.testing.assert_allclose(one, each, rtol=1e-5, atol=1e-5)
    assert np.abs(one[0] - one[1]).max() > 1e-4  # the rows differ: the conditions reach them


@pytest.mark.slow
def test_sdxl_calibrated_recipe_is_refused(sdxl_pipeline, tmp_path):
    from zoodip_edge.export import export_bundle

    with pytest.raises(UserError, match="w8a8-static is not available for SDXL"):
        export_bundle(str(sdxl_pipeline), tmp_path / "b", recipe="w8a8-static")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the runtime -------------

@pytest.mark.slow
def test_sdxl_bundle_is_inspected(sdxl_bundle):
    out, _ = sdxl_bundle
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0, r.output
    assert "model       sdxl from" in r.stdout and "feature     sdxl: unet 2" in r.stdout
    assert "text_encoder_2" in r.stdout and "requires    " in r.stdout and "sdxl" in r.stdout.split("requires")[1]
    assert "warning" not in r.stderr  # SDXL bundles do not predate their own feature
    ok(["inspect", out, "--json"])
    p = run_cli_without_torch(["inspect", str(out)])  # the device install reads SDXL bundles too
    assert p.returncode == 0 and "sdxl" in p.stdout, p.stderr


@pytest.mark.slow
def test_sdxl_bundle_is_not_run(sdxl_bundle, photos, tmp_path):
    out, _ = sdxl_bundle
    refused(personalize_args(out, photos, tmp_path / "e.safetensors", "--steps", "2"), out, tmp_path, match=REFUSAL)
    refused(["generate", out, "--prompt", f"a photo of {TOKEN}", "--out", tmp_path / "g", "--steps", "2", "-q",
             "--device", "cpu"], out, tmp_path, match=REFUSAL)
    assert list(tmp_path.iterdir()) == []
    from zoodip_edge.runtime.generate import Generator
    from zoodip_edge.runtime.sessions import BundleSessions

    with pytest.raises(UserError, match=REFUSAL):
        Generator(out, profile="cpu")
    with pytest.raises(UserError, match=REFUSAL):  # a bundle read for inspection is not run either
        BundleSessions(load_bundle(out, run=False), None)


@pytest.mark.slow
def test_sdxl_manifest_must_be_whole(sdxl_bundle, tmp_path):
    """An SDXL manifest without its second text encoder's entries, or without requiring sdxl, is refused."""
    src, _ = sdxl_bundle
    for change, match in ((lambda m: m.pop("text_2"), "family: sdxl needs text_2"),
                          (lambda m: m["components"].pop("text_encoder_2"), "needs components.text_encoder_2"),
                          (lambda m: m["requires"].remove("sdxl"), "needs requires: sdxl"),
                          (lambda m: m["components"]["text_encoder_2"]["inputs"][0].update(shape=["batch", 77, 65]),
                           "components.text_encoder_2: inputs_embeds is 65 where the token width is 64"),
                          (lambda m: m["text_2"].update(pad_token_id=10**6), "text_2.pad_token_id")):
        b = tmp_path / "b"
        shutil.rmtree(b, ignore_errors=True)
        shutil.copytree(src, b)
        m = json.loads((b / "manifest.json").read_text())
        change(m)
        (b / "manifest.json").write_text(json.dumps(m))
        refused(["inspect", b], b, match=match)
