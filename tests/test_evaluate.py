"""CLIP-I / CLIP-T / DINO: metric math on synthetic features, prompt lists, tiny random models."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from zoodip_edge.errors import UserError
from zoodip_edge.evaluate import clip_i, clip_t, cosine_matrix, dino, text_prompt, write_report
from zoodip_edge.prompts import LIVE_PROMPTS, OBJECT_PROMPTS, SUBJECT_CLASSES, dreambooth_prompts, subject_kind

# ---------------------------------------------------------------- metric math

def test_identical_features_score_one():
    rng = np.random.default_rng(0)
    f = rng.normal(size=(1, 8))
    same = np.repeat(f, 3, axis=0) * np.array([[1.0], [2.0], [0.5]])  # scale does not matter
    assert clip_i(same, same) == pytest.approx(1.0)
    assert dino(same, f) == pytest.approx(1.0)
    assert clip_t(same, f) == pytest.approx(1.0)


def test_orthogonal_features_score_zero():
    eye = np.eye(4)
    assert clip_i(eye[:2], eye[2:]) == pytest.approx(0.0)
    assert dino(eye[:1], eye[1:]) == pytest.approx(0.0)
    assert clip_t(eye[:2], eye[2:]) == pytest.approx(0.0)


def test_hand_computed_case_is_mean_over_all_pairs():
    gen = np.array([[1.0, 0.0], [0.0, 3.0]])
    ref = np.array([[2.0, 0.0], [1.0, 1.0]])
    s = 1 / np.sqrt(2)
    expected = np.array([[1.0, s], [0.0, s]])
    np.testing.assert_allclose(cosine_matrix(gen, ref), expected)
    # all four pairs: (1 + s + 0 + s) / 4; the diagonal alone would be (1 + s) / 2
    assert clip_i(gen, ref) == pytest.approx((1 + 2 * s) / 4)
    assert clip_i(gen, ref) != pytest.approx((1 + s) / 2)
    assert dino(gen, ref) == pytest.approx((1 + 2 * s) / 4)
    # CLIP-T pairs image i with text i only: (1 + s) / 2
    assert clip_t(gen, ref) == pytest.approx((1 + s) / 2)


def test_pairwise_metrics_are_symmetric_and_bounded():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 16)), rng.normal(size=(3, 16))
    assert clip_i(a, b) == pytest.approx(clip_i(b, a))
    assert -1.0 <= clip_i(a, b) <= 1.0
    assert clip_i(a, -a) == pytest.approx(-clip_i(a, a))


def test_metric_input_errors():
    with pytest.raises(UserError):
        clip_i(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(UserError):
        clip_t(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(UserError):
        dino(np.zeros((0, 4)), np.ones((2, 4)))


def test_text_prompt_replaces_token_by_class_noun():
    assert text_prompt("a sks dog in the jungle", "sks", "dog") == "a dog in the jungle"
    assert text_prompt("a photo of <sks>", "<sks>", "dog") == "a photo of dog"
    assert text_prompt("a red sks backpack", "sks", "backpack") == "a red backpack"
    assert text_prompt("a task on the desk", "sks", "dog") == "a task on the desk"  # whole words only


# ---------------------------------------------------------------- prompts

def test_prompt_lists():
    assert len(OBJECT_PROMPTS) == len(LIVE_PROMPTS) == 25
    for t in OBJECT_PROMPTS + LIVE_PROMPTS:
        assert "{0}" in t and "{1}" in t
    assert len(set(OBJECT_PROMPTS)) == len(set(LIVE_PROMPTS)) == 25
    assert OBJECT_PROMPTS[:3] == ("a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach")
    assert "a {0} {1} wearing a red hat" in LIVE_PROMPTS and "a {0} {1} in a chef outfit" in LIVE_PROMPTS
    obj = dreambooth_prompts("object", "sks", "backpack")
    live = dreambooth_prompts("live", "sks", "dog")
    assert len(obj) == len(live) == 25
    assert obj[0] == "a sks backpack in the jungle" and live[-1] == "a cube shaped sks dog"
    assert all("sks" in p and "{" not in p for p in obj + live)
    with pytest.raises(UserError):
        dreambooth_prompts("animal", "sks", "dog")


def test_subject_classes():
    assert len(SUBJECT_CLASSES) == 30
    assert subject_kind("dog3") == subject_kind("cat") == "live"
    assert subject_kind("backpack_dog") == subject_kind("teapot") == "object"


def test_module_imports_stay_light():
    code = ("import sys, zoodip_edge.evaluate, zoodip_edge.prompts; "
            "print(any(m in sys.modules for m in ('torch', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- tiny random models

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from zoodip_edge.export.tiny import write_clip_bpe

    out = tmp_path_factory.mktemp("tiny-clip")
    vocab = write_clip_bpe(out)
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                         num_hidden_layers=2, max_position_embeddings=77,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory) -> Path:
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    out = tmp_path_factory.mktemp("tiny-dino")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(out)
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                      do_center_crop=True).save_pretrained(out)
    return out


def _images(seed: int, n: int, size: int = 40) -> list:
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_scorers_embed_normalized(tiny_clip, tiny_dino):
    from zoodip_edge.evaluate import ClipScorer, DinoScorer

    clip, dn = ClipScorer(str(tiny_clip), device="cpu"), DinoScorer(str(tiny_dino), device="cpu")
    ims = _images(0, 3)
    f = clip.image_features(ims)
    t = clip.text_features(["a dog in the jungle", "a red backpack"])
    d = dn.image_features(ims)
    assert f.shape == (3, 16) and t.shape == (2, 16) and d.shape == (3, 32)
    for x in (f, t, d):
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    # batching does not change the embeddings
    clip.batch_size = 1
    np.testing.assert_allclose(clip.image_features(ims), f, atol=1e-5)


def test_evaluate_images_on_tiny_models(tiny_clip, tiny_dino, tmp_path):
    from zoodip_edge.evaluate import ClipScorer, DinoScorer, evaluate_images

    clip, dn = ClipScorer(str(tiny_clip), device="cpu"), DinoScorer(str(tiny_dino), device="cpu")
    refs = _images(1, 3)
    prompts = dreambooth_prompts("live", "sks", "dog")[:2]
    generated = {prompts[0]: _images(2, 2), prompts[1]: _images(3, 2)}

    res = evaluate_images(generated, refs, class_word="dog", token="sks", clip=str(tiny_clip), dino=str(tiny_dino))
    for key in ("clip_i", "clip_t", "dino"):
        assert -1.0 <= res[key] <= 1.0
    assert (res["num_prompts"], res["num_generated"], res["num_references"]) == (2, 4, 3)
    assert res["per_prompt"][prompts[0]]["text"] == "a dog in the jungle"
    # equal counts per prompt: the pooled score is the mean of the per-prompt scores
    assert res["clip_i"] == pytest.approx(np.mean([r["clip_i"] for r in res["per_prompt"].values()]))

    # identical image sets score 1 (CLIP-I is the mean over all pairs, so use one image)
    one = _images(4, 1)
    same = evaluate_images({prompts[0]: one * 2}, one, "dog", "sks", clip=clip, dino=dn)
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)

    # swapping generated and reference leaves the pairwise metrics unchanged
    a, b = _images(5, 2), _images(6, 3)
    ab = evaluate_images({prompts[0]: a}, b, "dog", "sks", clip=clip, dino=dn)
    ba = evaluate_images({prompts[0]: b}, a, "dog", "sks", clip=clip, dino=dn)
    assert ab["clip_i"] == pytest.approx(ba["clip_i"], abs=1e-6)
    assert ab["dino"] == pytest.approx(ba["dino"], abs=1e-6)

    write_report(res, tmp_path / "r" / "metrics.json", tmp_path / "r" / "metrics.md")
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["clip_i"] == pytest.approx(res["clip_i"])
    md = (tmp_path / "r" / "metrics.md").read_text()
    assert "| CLIP-I |" in md and "| DINO |" in md and prompts[1] in md

    with pytest.raises(UserError):
        evaluate_images({}, refs, "dog", "sks", clip=clip, dino=dn)
    with pytest.raises(UserError):
        evaluate_images(generated, [], "dog", "sks", clip=clip, dino=dn)


def test_missing_model_folder_is_a_user_error(tmp_path, tiny_clip):
    from zoodip_edge.evaluate import ClipScorer, DinoScorer

    with pytest.raises(UserError, match="local folder"):
        ClipScorer(str(tmp_path / "no-such-clip"))
    with pytest.raises(UserError, match="local folder"):
        DinoScorer(str(tmp_path / "no-such-dino"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="CLIP model .*local folder"):
        ClipScorer(str(empty))
    # a folder with a config but no weights or tokenizer
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((tiny_clip / "config.json").read_text())
    with pytest.raises(UserError):
        ClipScorer(str(broken))
    # a hub id with no network (conftest sets HF_HUB_OFFLINE) and nothing cached
    with pytest.raises(UserError, match="nobody/no-such-dino"):
        DinoScorer("nobody/no-such-dino")


@pytest.mark.slow  # a full export or a trained run
def test_cli_evaluate_all_generates_with_dreambooth_prompts_and_scores(sd1_bundle, tiny_clip, tiny_dino, tmp_path):
    from typer.testing import CliRunner

    from zoodip_edge.cli import app
    from zoodip_edge.demo import draw_photos
    from zoodip_edge.embeddings import save_embedding

    emb = tmp_path / "e.safetensors"
    save_embedding(emb, "<thing>", np.random.default_rng(0).standard_normal((1, 32)).astype(np.float32))
    refs = draw_photos(tmp_path / "refs")
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["evaluate", "--references", str(refs), "--class-word", "ball", "--token", "<thing>",
                                 "--out", str(out), "--all", "--bundle", str(sd1_bundle), "--embedding", str(emb),
                                 "-n", "1", "--steps", "2", "--device", "cpu", "--clip", str(tiny_clip), "--dino", str(tiny_dino)])
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert res["num_prompts"] == 25 and res["num_generated"] == 25
    assert len(list((out / "images").iterdir())) == 25 and (out / "results.md").exists()
    r = CliRunner().invoke(app, ["evaluate", "--references", str(refs), "--class-word", "ball", "--token", "<thing>",
                                 "--out", str(out), "--clip", str(tiny_clip), "--dino", str(tiny_dino)])
    assert r.exit_code == 2 and "either --generated" in r.output
