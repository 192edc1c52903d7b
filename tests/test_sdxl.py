"""SDXL on a tiny random-weight StableDiffusionXLPipeline: the export (graphs, manifest, gates) and
the runtime (inspect, personalize, generate), checked against diffusers on the same weights."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import test_evaluate
import torch

from zoodip_edge.bundle import FEATURES, load_bundle
from zoodip_edge.cli import app
from zoodip_edge.errors import UserError

from cli_checks import TOKEN, ok, personalize_args, refused, runner
from conftest import run_cli_without_torch

# the tiny random CLIP and DINO models test_evaluate.py scores with (no download), for `evaluate` here
tiny_clip, tiny_dino = test_evaluate.tiny_clip, test_evaluate.tiny_dino


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


def test_sdxl_feature_is_known_and_run():
    f = FEATURES["sdxl"]
    assert f.families == ("sdxl",) and f.unsupported is None and f.key == "added_conditions"


@pytest.mark.slow
def test_a_feature_marked_unsupported_is_still_refused(sdxl_bundle, monkeypatch):
    """No feature is read-only now, but the mechanism that refused SDXL before it ran stays: a
    feature with ``unsupported`` makes Generator and BundleSessions refuse the bundle in one line."""
    import dataclasses

    from zoodip_edge.runtime.generate import Generator
    from zoodip_edge.runtime.sessions import BundleSessions

    out, _ = sdxl_bundle
    monkeypatch.setitem(FEATURES, "sdxl", dataclasses.replace(FEATURES["sdxl"], unsupported="not run here"))
    with pytest.raises(UserError, match="not run here"):
        Generator(out, profile="cpu")
    with pytest.raises(UserError, match="not run here"):
        BundleSessions(load_bundle(out, run=False), None)


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
def test_sdxl_fp16_keeps_the_vae_in_float32(sdxl_pipeline, work):
    """SDXL's VAE overflows in float16 (diffusers upcasts it): the fp16 recipe converts the text
    encoders and U-Net, not the VAE, and the manifest says which recipe made each graph."""
    import onnx

    out, m = sdxl_export(sdxl_pipeline, work, "fp16")
    for graph, want in (("text_encoder", "FLOAT16"), ("text_encoder_2", "FLOAT16"), ("unet", "FLOAT16"),
                        ("vae_encoder", "FLOAT"), ("vae_decoder", "FLOAT")):
        model = onnx.load(str(out / m["components"][graph]["path"]), load_external_data=False)
        weights = {onnx.TensorProto.DataType.Name(i.data_type) for i in model.graph.initializer if len(i.dims) > 1}
        assert weights == {want}, (graph, weights)
        assert m["recipe"]["graphs"][graph]["recipe"] == ("fp32" if graph.startswith("vae") else "fp16")


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


# ------------------------------------------------------------------ personalize -------------

def _sdxl_personalize(bundle, photos, out, *extra):
    return personalize_args(bundle, photos, out, "--seed", "3", *extra)


@pytest.fixture(scope="module")
def sdxl_learned(sdxl_bundle, photos, tmp_path_factory):
    """Four steps on the tiny SDXL bundle through the CLI, with a JSONL log: the embedding file."""
    out = tmp_path_factory.mktemp("sdxl-learned") / "learned_embeds.safetensors"
    ok(_sdxl_personalize(sdxl_bundle[0], photos, out, "--steps", "4", "--log-jsonl", out.with_suffix(".jsonl")))
    return out


def _init_rows(bundle) -> tuple[np.ndarray, np.ndarray]:
    """The rows of the --init word ("dog") in both token tables."""
    from zoodip_edge.runtime.text import bundle_prompt_encoder

    text = bundle_prompt_encoder(load_bundle(bundle))
    return text.split(text.init_row("dog"))


@pytest.mark.slow
def test_sdxl_personalize_writes_an_sdxl_embedding(sdxl_bundle, sdxl_learned):
    """One θ of d1 + d2 values is learned from the --init word's rows in both tables; the file is
    the SDXL layout (clip_l, clip_g), one vector each, and the JSONL log has every step."""
    from zoodip_edge.embeddings import load_embedding

    token, vec, meta = load_embedding(sdxl_learned)
    assert token == TOKEN and meta["family"] == "sdxl" and meta["steps"] == "4"
    assert vec["clip_l"].shape == (1, 32) and vec["clip_g"].shape == (1, 64)
    first, second = _init_rows(sdxl_bundle[0])
    moved = [np.abs(vec["clip_l"][0] - first).max(), np.abs(vec["clip_g"][0] - second).max()]
    assert all(0 < d < 1 for d in moved), moved  # both rows moved from the start, by a few small steps
    log = [json.loads(line) for line in sdxl_learned.with_suffix(".jsonl").read_text().splitlines()]
    assert log[0]["type"] == "start" and len(log[0]["theta0"]) == 96 and len(log) == 5
    np.testing.assert_allclose(log[0]["theta0"], np.concatenate([first, second]), rtol=1e-6)


@pytest.mark.slow
def test_sdxl_embedding_loads_into_both_diffusers_encoders(sdxl_pipeline, sdxl_learned):
    """diffusers takes the file with one load_textual_inversion call per encoder: each encoder's
    new row is the file's, and the token is one new id in each tokenizer."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_pipeline)
    state = load_file(str(sdxl_learned))
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    for key, encoder, tokenizer in (("clip_l", pipe.text_encoder, pipe.tokenizer), ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):
        ids = tokenizer(f"a photo of {TOKEN}", add_special_tokens=False).input_ids
        new = tokenizer.convert_tokens_to_ids(TOKEN)
        assert ids[-1] == new == len(tokenizer) - 1
        torch.testing.assert_close(encoder.get_input_embeddings().weight[new], state[key][0], rtol=0, atol=0)


@pytest.mark.slow
def test_sdxl_resume_equals_uninterrupted_run(sdxl_bundle, photos, sdxl_learned, tmp_path):
    """Two steps, then two more with --resume, give the four-step run's file exactly (same seed)."""
    from safetensors.numpy import load_file

    out = tmp_path / "resumed.safetensors"
    ok(_sdxl_personalize(sdxl_bundle[0], photos, out, "--steps", "2"))
    assert not np.array_equal(load_file(str(out))["clip_g"], load_file(str(sdxl_learned))["clip_g"])
    ok(_sdxl_personalize(sdxl_bundle[0], photos, out, "--steps", "4", "--resume"))
    whole, resumed = load_file(str(sdxl_learned)), load_file(str(out))
    assert set(resumed) == {"clip_l", "clip_g"}
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], whole[key])


@pytest.mark.slow
def test_sdxl_a1111_format_is_the_sdxl_layout(sdxl_bundle, photos, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "red-ball.safetensors"
    ok(_sdxl_personalize(sdxl_bundle[0], photos, out, "--steps", "1", "--format", "a1111"))
    with safe_open(str(out), "np") as f:
        assert set(f.keys()) == {"clip_l", "clip_g"} and f.metadata()["name"] == TOKEN


@pytest.mark.slow
def test_sdxl_continues_from_an_sdxl_embedding(sdxl_bundle, photos, sdxl_learned):
    """--init-embedding with an SDXL file starts from its two rows, side by side."""
    from zoodip_edge.embeddings import load_embedding
    from zoodip_edge.runtime.personalize import Personalizer

    _, vec, _ = load_embedding(sdxl_learned)
    p = Personalizer(sdxl_bundle[0], photos, "<more>", "dog", profile="cpu", init_embedding=vec)
    np.testing.assert_array_equal(p.theta0, np.concatenate([vec["clip_l"][0], vec["clip_g"][0]]))


# ------------------------------------------------------------------ the searched start -------

@pytest.mark.slow  # exports the tiny SDXL pipeline
def test_sdxl_search_init_finds_a_word_no_worse_than_the_init_word(sdxl_bundle, photos):
    """The candidates are whole words both tokenizers know, θ their row in each table side by side;
    the winner (a word or a mix of the best two or three, rescaled table by table) is no worse than
    the --init word on the same probes."""
    from zoodip_edge.runtime.init_search import _mean_losses, candidate_rows, search_initializer, word_candidates
    from zoodip_edge.runtime.personalize import Personalizer

    p = Personalizer(sdxl_bundle[0], photos, TOKEN, "dog", profile="cpu")
    words = word_candidates(p)
    first, second = (set(w.removesuffix("</w>") for w in enc.tok.get_vocab(with_added_tokens=False)) for enc in (p.text.first, p.text.second))
    assert words and all(w in first and w in second for w, _ in words)
    assert ("dog", (p.text.first.single_token_id("dog"), p.text.second.single_token_id("dog"))) in words
    np.testing.assert_array_equal(candidate_rows(p.text, [words[0][1]])[0],
                                  np.concatenate([p.text.first.table[words[0][1][0]], p.text.second.table[words[0][1][1]]]))
    probes = [(int(t), 9000 + i) for i, t in enumerate(np.linspace(700, 899, 12))]
    found = search_initializer(p, probes, first=4)
    assert found.theta.shape == (96,) and found.forwards > 0
    names = {w for w, _ in words}
    assert set(found.label.split(" + ")) <= names and 1 <= len(found.label.split(" + ")) <= 3
    init_loss = _mean_losses(p, p.theta0[None], probes, 32)[0]
    assert found.loss <= init_loss, (found.label, found.loss, init_loss)
    np.testing.assert_allclose(_mean_losses(p, found.theta[None], probes, 32)[0], found.loss, rtol=1e-5)


@pytest.mark.slow
def test_sdxl_personalize_with_search_init(sdxl_bundle, photos, tmp_path):
    """--search-init on an SDXL bundle through the CLI: the file's provenance names the found start."""
    from zoodip_edge.embeddings import load_embedding

    out = tmp_path / "searched.safetensors"
    r = runner.invoke(app, [str(a) for a in _sdxl_personalize(sdxl_bundle[0], photos, out, "--steps", "1", "--search-init")])
    assert r.exit_code == 0, (r.output, r.exception)
    start = next(line for line in r.stderr.splitlines() if line.startswith("start: "))
    _, vec, meta = load_embedding(out)
    assert start.startswith(f"start: {meta['start']} (") and vec["clip_l"].shape == (1, 32) and vec["clip_g"].shape == (1, 64)


# ------------------------------------------------------------------ memory budget -------------

@pytest.mark.slow  # exports the tiny SDXL pipeline
def test_sdxl_memory_estimate_counts_both_text_encoders_and_refuses_over_the_budget(sdxl_bundle, photos, tmp_path):
    """A resident profile holds both text encoders and the U-Net, plus both token tables; over a
    tiny budget personalize is refused in one line and writes nothing."""
    from test_memory import profile_file

    from zoodip_edge.runtime.memory import estimate_memory

    b = load_bundle(sdxl_bundle[0])
    est = estimate_memory(b, resident_sessions=True)
    m = b.manifest
    assert est.graphs == ("text_encoder", "text_encoder_2", "unet")
    want = sum(m["components"][g]["bytes"] for g in est.graphs) + m["token_embeddings"]["bytes"] + m["token_embeddings_2"]["bytes"]
    assert est.weights_mb == pytest.approx(want / 2**20)
    line = refused([*_sdxl_personalize(sdxl_bundle[0], photos, tmp_path / "e.safetensors", "--steps", "1"),
                    "--device", profile_file(tmp_path, 100)], sdxl_bundle[0], photos, tmp_path, match="this sdxl int8-cpu bundle needs")
    assert "text_encoder + text_encoder_2 + unet loaded at once" in line and "memory_budget_mb of 100;" in line


# ------------------------------------------------------------------ generate ----------------

@pytest.mark.slow
def test_sdxl_generate_with_and_without_an_embedding(sdxl_bundle, sdxl_learned, tmp_path):
    from PIL import Image

    out = sdxl_bundle[0]
    images = {}
    for name, extra in (("plain", []), ("learned", ["--embedding", sdxl_learned])):
        ok(["generate", out, "--prompt", f"a photo of {TOKEN}" if extra else "a photo of a dog", "--out", tmp_path / name,
            "--steps", "3", "-q", "--device", "cpu", *extra])
        images[name] = np.asarray(Image.open(tmp_path / name / "0000-00.png"))
    assert images["plain"].shape == images["learned"].shape == (64, 64, 3)
    assert not np.array_equal(images["plain"], images["learned"])


@pytest.mark.slow
def test_sdxl_tiled_decode_is_close_to_the_whole(sdxl_bundle, tmp_path):
    """`generate --tile` on an SDXL bundle (latent_scale 0.13025; the decoder takes any latent size).
    A tile as large as the 8 x 8 latent is no tiling: the same PNG, byte for byte. Tiles of 6 give
    the same picture with seams: pixel correlation with the untiled PNG over 0.9 (measured 0.93 to
    0.95 for seeds 0 to 3) and a mean absolute difference under 16 of 255 (measured 9.6 to 10.4),
    where another seed's picture correlates about 0.1 and differs by about 42. The gap is the tiny
    random decoder's: its GroupNorms and mid-block attention see one tile at a time, and its
    receptive field spans the whole latent (the tiny SD1 bundle's gap is the same size). On a
    32 x 32 latent the gap shrinks as the tiles grow, and is nothing at the whole latent."""
    from PIL import Image

    from zoodip_edge.runtime.generate import Generator

    bundle = sdxl_bundle[0]

    def png(name: str, *extra: str, seed: int = 0) -> np.ndarray:
        ok(["generate", bundle, "--prompt", "a photo of a dog", "--out", tmp_path / name, "--steps", "3", "-q",
            "--device", "cpu", "--seed", str(seed), *extra])
        return np.asarray(Image.open(tmp_path / name / f"{seed:04d}-00.png"), np.float32)

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    whole, tiled, one_tile, other = png("whole"), png("tiled", "--tile", "6"), png("one", "--tile", "8"), png("o", seed=10)
    assert np.array_equal(one_tile, whole)
    gap = np.abs(tiled - whole).mean()
    assert corr(tiled, whole) > 0.9 and 0 < gap < 16, (corr(tiled, whole), gap)
    assert corr(other, whole) < 0.5 and np.abs(other - whole).mean() > 2 * gap

    g = Generator(bundle, profile="cpu")
    scale = g.bundle.manifest["latent_scale"]
    assert scale == pytest.approx(0.13025)
    z = (np.random.default_rng(0).standard_normal((1, 4, 32, 32)) * scale).astype(np.float32)
    full = g.decode(z)
    gaps = [float(np.abs(g.decode(z, tile=t) - full).mean()) for t in (4, 8, 16)]  # measured 0.31, 0.22, 0.08
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps
    assert np.array_equal(g.decode(z, tile=32), full)


@pytest.mark.slow
def test_sdxl_evaluate_all_generates_and_scores(sdxl_bundle, sdxl_learned, photos, tiny_clip, tiny_dino, tmp_path):
    """`evaluate --all` on an SDXL bundle and its learned SDXL file: the DreamBooth prompts are
    generated (both encoders, the token's two rows) and scored by the tiny random CLIP and DINO
    models of test_evaluate.py (no download); then --generated on one of those image folders."""
    out = tmp_path / "eval"
    ok(["evaluate", "--references", photos, "--class-word", "ball", "--token", TOKEN, "--out", out, "--all",
        "--bundle", sdxl_bundle[0], "--embedding", sdxl_learned, "-n", "1", "--steps", "2", "--device", "cpu",
        "--clip", tiny_clip, "--dino", tiny_dino])
    res = json.loads((out / "results.json").read_text())
    assert res["num_prompts"] == 25 and res["num_generated"] == 25 and res["token"] == TOKEN
    assert all(-1 <= res[k] <= 1 for k in ("clip_i", "clip_t", "dino"))
    first = sorted((out / "images").iterdir())[0]
    prompt = next(iter(res["per_prompt"]))
    ok(["evaluate", "--references", photos, "--class-word", "ball", "--token", TOKEN, "--out", tmp_path / "one",
        "--generated", first, "--prompt", prompt, "--clip", tiny_clip, "--dino", tiny_dino])
    one = json.loads((tmp_path / "one" / "results.json").read_text())
    assert one["num_generated"] == 1 and one["clip_i"] == pytest.approx(res["per_prompt"][prompt]["clip_i"], abs=1e-6)


def _first_step(pipeline, bundle, embedding, prompt, negative, seed=3):
    """The U-Net's first call in diffusers' StableDiffusionXLPipeline (DDIM, our latents) and in
    Generator: (diffusers' inputs and output, ours)."""
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from zoodip_edge.runtime.generate import Generator

    pipe = StableDiffusionXLPipeline.from_pretrained(pipeline)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    state = load_file(str(embedding))
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    theirs = []
    pipe.unet.register_forward_hook(lambda m, args, kwargs, out: theirs.append((args, kwargs, out[0].numpy())), with_kwargs=True)
    latents = np.random.default_rng(seed).standard_normal((1, 4, 8, 8)).astype(np.float32)  # as Generator draws them
    pipe(prompt, negative_prompt=negative, num_inference_steps=3, guidance_scale=7.5, height=64, width=64,
         latents=torch.from_numpy(latents), output_type="latent")
    g = Generator(bundle, profile="cpu", embeddings=[embedding])
    ours, unet = [], g._unet
    g._unet = lambda sess, x, t, ctx: ours.append((x, t, ctx, unet(sess, x, t, ctx))) or ours[-1][-1]
    g.generate(prompt, negative_prompt=negative or "", steps=3, seed=seed, guidance=7.5)
    return theirs[0], ours[0]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, tolerance", [("fp32", 1e-4), ("int8-cpu", 0.1)])
@pytest.mark.parametrize("prompt, negative", [(f"a photo of {TOKEN}", None), (f"a photo of {TOKEN}", "a blurry photo")])
def test_sdxl_first_step_matches_diffusers(sdxl_pipeline, work, sdxl_learned, recipe, tolerance, prompt, negative):
    """Generator's first U-Net call on an SDXL bundle against StableDiffusionXLPipeline's on the same
    weights, latents and learned token: both encoders' penultimate states side by side, the pooled
    output (where CLIP pools: the learned token holds the highest id), (H, W, 0, 0, H, W) time ids,
    and zeros for a missing negative prompt (force_zeros_for_empty_prompt). Tolerance: each recipe's
    per-graph parity tolerance against torch fp32 (fp32 1e-4: measured ~1e-6; int8-cpu 0.1: ~0.011)."""
    bundle, m = sdxl_export(sdxl_pipeline, work, recipe)
    (args, kwargs, ref), (x, t, ctx, out) = _first_step(sdxl_pipeline, bundle, sdxl_learned, prompt, negative)
    assert m["conditioning"]["force_zeros_for_empty_prompt"] is True
    assert t == int(args[1]) and np.array_equal(x[0], args[0][0].numpy())  # same timestep, same latent
    assert (negative is None) == (not ctx["encoder_hidden_states"][0].any() and not ctx["text_embeds"][0].any())
    added = kwargs["added_cond_kwargs"]
    np.testing.assert_array_equal(ctx["time_ids"], added["time_ids"].numpy())
    for mine, theirs in ((ctx["encoder_hidden_states"], kwargs["encoder_hidden_states"]), (ctx["text_embeds"], added["text_embeds"]),
                         (out, ref)):
        rel = np.linalg.norm(mine - theirs.numpy() if hasattr(theirs, "numpy") else mine - theirs) / np.linalg.norm(
            theirs.numpy() if hasattr(theirs, "numpy") else theirs)
        assert rel <= tolerance, rel
    assert out.shape == ref.shape == (2, 4, 8, 8)


# ------------------------------------------------------------------ refusals ----------------

@pytest.mark.slow
def test_sdxl_refuses_single_encoder_embeddings_and_the_reverse(sdxl_bundle, sd1_bundle, sdxl_learned, photos, tmp_path):
    from zoodip_edge.embeddings import save_embedding

    out = sdxl_bundle[0]
    sd1_file = tmp_path / "sd1.safetensors"
    save_embedding(sd1_file, TOKEN, np.ones((1, 32), np.float32))
    gen = lambda bundle, emb: ["generate", bundle, "--prompt", f"a photo of {TOKEN}", "--out", tmp_path / "g",  # noqa: E731
                               "--steps", "2", "-q", "--device", "cpu", "--embedding", emb]
    refused(gen(out, sd1_file), out, tmp_path, match="is an SD1/SD2 embedding (one text encoder); this SDXL bundle needs clip_l")
    refused(gen(sd1_bundle, sdxl_learned), sd1_bundle, tmp_path, match="is an SDXL embedding (clip_l and clip_g); this sd1 bundle")
    refused(_sdxl_personalize(out, photos, tmp_path / "e.safetensors", "--steps", "1", "--init-embedding", sd1_file), out, tmp_path,
            match="is an SD1/SD2 embedding (one text encoder)")
    refused(personalize_args(sd1_bundle, photos, tmp_path / "e.safetensors", "--steps", "1", "--init-embedding", sdxl_learned),
            sd1_bundle, tmp_path, match="is an SDXL embedding (clip_l and clip_g)")
    assert not (tmp_path / "g").exists() and not (tmp_path / "e.safetensors").exists()


def test_sdxl_unet_is_told_each_photos_size_and_crop(sdxl_bundle, tmp_path):
    """Each step's U-Net feed carries the drawn photo's own time ids (original size, crop, target),
    as diffusers' SDXL textual inversion does, not the bundle's uncropped square."""
    from PIL import Image

    from zoodip_edge.runtime import Personalizer
    from zoodip_edge.runtime.images import sdxl_time_ids

    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"wide.png": (48, 80), "tall.png": (96, 40), "square.png": (64, 64)}  # (height, width)
    rng = np.random.default_rng(0)
    for name, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(photos / name)
    p = Personalizer(sdxl_bundle[0], photos, TOKEN, "dog", profile="cpu")
    fed, run = [], p._run

    def spy(sess, feed, output, keep_on_device):
        if "time_ids" in feed:
            fed.append(feed["time_ids"].copy())
        return run(sess, feed, output, keep_on_device)

    p._run = spy
    r = sdxl_bundle[1]["resolution"]
    drawn = set()
    for seed in range(12):
        fed.clear()
        p.losses(p.theta[None], 700, seed)
        ex = p.draw_example(700, seed)[0]
        drawn.add(ex.name)
        want = sdxl_time_ids(sizes[ex.name], r)
        assert fed and all(np.array_equal(f, np.repeat(want[None], len(f), 0)) for f in fed)
    assert drawn == set(sizes)  # every photo was drawn, so three different time ids were fed
    wide = sdxl_time_ids(sizes["wide.png"], r)
    assert list(wide[:2]) == [48, 80] and wide[2] == 0 and wide[3] > 0 and list(wide[4:]) == [r, r]


def test_sdxl_refuses_the_encoder_guide_in_one_line(sdxl_bundle, photos, tmp_path):
    """guide_encoder reads one text encoder's Jacobian; on SDXL's two it is refused before any work."""
    refused([*_sdxl_personalize(sdxl_bundle[0], photos, tmp_path / "e.safetensors", "--steps", "1", "--guide-encoder", "4")],
            sdxl_bundle[0], photos, tmp_path, match="guide_encoder reads one text encoder's response")
