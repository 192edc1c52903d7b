"""Generation with learned tokens, format conversion, continuing from an embedding, previews."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from zoodip_edge.cli import app
from zoodip_edge.embeddings import load_embedding, save_embedding
from zoodip_edge.runtime.generate import Generator

runner = CliRunner()


@pytest.fixture(scope="module")
def learned(sd1_bundle, tmp_path_factory):
    """A learned-embedding file with a distinctive vector (large, so it changes the conditioning)."""
    path = tmp_path_factory.mktemp("emb") / "learned_embeds.safetensors"
    rng = np.random.default_rng(0)
    save_embedding(path, "<thing>", rng.standard_normal((1, 32)).astype(np.float32))
    return path


def test_generate_is_deterministic_and_uses_the_token(sd1_bundle, learned):
    g = Generator(sd1_bundle, profile="cpu", embeddings=[learned])
    a = g.generate("a photo of <thing>", steps=4, seed=1)[0]
    b = g.generate("a photo of <thing>", steps=4, seed=1)[0]
    c = g.generate("a photo of a dog", steps=4, seed=1)[0]
    assert a.size == (64, 64) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c)), "the learned token must change the image"


def test_text_encoder_input_has_the_learned_row(sd1_bundle, learned):
    g = Generator(sd1_bundle, profile="cpu", embeddings=[learned])
    _, vec, _ = load_embedding(learned)
    emb = g.text.embed("a photo of <thing>")[0]
    assert any(np.array_equal(row, vec[0]) for row in emb)


def test_multi_vector_embeddings_expand_like_diffusers(sd1_bundle, tmp_path):
    path = tmp_path / "multi.safetensors"
    rows = np.arange(64, dtype=np.float32).reshape(2, 32)
    save_file({"<two>": rows}, str(path))
    g = Generator(sd1_bundle, profile="cpu", embeddings=[path])
    emb = g.text.embed("<two> dog")[0]
    assert np.array_equal(emb[1], rows[0]) and np.array_equal(emb[2], rows[1])


@pytest.mark.parametrize("scheduler", ["ddim", "dpm++", "euler"])
def test_cli_generate_writes_pngs_and_grid(sd1_bundle, learned, tmp_path, scheduler):
    out = tmp_path / "imgs"
    r = runner.invoke(app, ["generate", str(sd1_bundle), "--prompt", "a photo of <thing> on a beach", "--embedding", str(learned),
                            "--out", str(out), "-n", "2", "--steps", "3", "--scheduler", scheduler, "--device", "cpu", "-q"])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["0000-00.png", "0000-01.png", "grid.png"]
    assert Image.open(out / "grid.png").size == (128, 64)


def test_cli_generate_refusals(sd1_bundle, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"<wide>": np.zeros((1, 48), np.float32)}, str(bad))
    r = runner.invoke(app, ["generate", str(sd1_bundle), "--prompt", "x", "--embedding", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "48 values" in r.output
    r = runner.invoke(app, ["generate", str(sd1_bundle), "--prompt", "x", "--scheduler", "lms", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "lms" in r.output


def test_convert_round_trip(learned, tmp_path):
    a1111 = tmp_path / "thing.safetensors"
    back = tmp_path / "back.safetensors"
    assert runner.invoke(app, ["convert", str(learned), str(a1111), "--format", "a1111"]).exit_code == 0
    assert list(load_file(str(a1111))) == ["emb_params"]
    assert runner.invoke(app, ["convert", str(a1111), str(back)]).exit_code == 0
    np.testing.assert_array_equal(load_file(str(back))["<thing>"], load_file(str(learned))["<thing>"])
    r = runner.invoke(app, ["convert", str(learned), str(back)])
    assert r.exit_code == 2 and "--force" in r.output


def _personalize(bundle, photos, out, *extra):
    return runner.invoke(app, ["personalize", str(bundle), str(photos), "--token", "<p>", "--init", "dog",
                               "--out", str(out), "--device", "cpu", "-q", *extra])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from zoodip_edge.demo import draw_photos

    return draw_photos(tmp_path_factory.mktemp("photos"))


def test_init_embedding_continues_training(sd1_bundle, photos, tmp_path):
    first = tmp_path / "first.safetensors"
    # from the --init word: the search for a better start (test_steps.py) would take most of the run
    assert _personalize(sd1_bundle, photos, first, "--no-search-init", "--steps", "5").exit_code == 0
    second = tmp_path / "second.safetensors"
    r = _personalize(sd1_bundle, photos, second, "--steps", "1", "--init-embedding", str(first), "--lr", "1e-12")
    assert r.exit_code == 0, r.output
    # with a vanishing learning rate, the result stays at the starting embedding
    np.testing.assert_allclose(load_file(str(second))["<p>"], load_file(str(first))["<p>"], atol=1e-9)


def test_preview_images_are_written_beside_the_checkpoint(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    r = _personalize(sd1_bundle, photos, out, "--no-search-init", "--steps", "4", "--preview-every", "2")
    assert r.exit_code == 0, r.output
    previews = sorted(p.name for p in tmp_path.glob("e-preview-*.png"))
    assert previews == ["e-preview-000002.png", "e-preview-000004.png"]


def test_tiled_decoding_blends_exactly_for_a_local_decoder():
    """With a decoder that acts pixel by pixel (8x upsampling), tiles must reassemble the whole exactly."""
    from zoodip_edge.runtime.generate import decode_tiled

    def run(z):
        return np.repeat(np.repeat(np.tanh(z[:, :3]), 8, axis=2), 8, axis=3)

    z = np.random.default_rng(0).standard_normal((1, 4, 20, 28)).astype(np.float32)
    np.testing.assert_allclose(decode_tiled(run, z, tile=8), run(z), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(decode_tiled(run, z, tile=12, overlap=5), run(z), rtol=1e-6, atol=1e-6)


def test_tiled_generation_runs_on_the_bundle(sd1_bundle):
    g = Generator(sd1_bundle, profile="cpu")
    whole = np.asarray(g.generate("a dog", steps=2, seed=0)[0], dtype=np.float32)
    tiled = np.asarray(g.generate("a dog", steps=2, seed=0, tile=4)[0], dtype=np.float32)
    assert tiled.shape == whole.shape and np.isfinite(tiled).all()
    assert np.abs(tiled - whole).mean() < 64  # same picture, seams aside (random-weight decoder)


def test_several_embeddings_at_once(sd1_bundle, learned, tmp_path):
    other = tmp_path / "other.safetensors"
    save_embedding(other, "<other>", np.full((1, 32), 0.5, np.float32))
    g = Generator(sd1_bundle, profile="cpu", embeddings=[learned, other])
    prompt = "<thing> next to <other>"
    ids, emb = g.text.ids(prompt), g.text.embed(prompt)[0]
    at = {tok: int(np.flatnonzero(ids == g.text.tok.token_to_id(tok))[0]) for tok in ("<thing>", "<other>")}
    assert np.array_equal(emb[at["<thing>"]], load_file(str(learned))["<thing>"][0])
    assert np.array_equal(emb[at["<other>"]], np.full(32, 0.5, np.float32))
    with pytest.raises(Exception, match="already in the vocabulary"):
        Generator(sd1_bundle, profile="cpu", embeddings=[learned, learned])


def test_guided_image_sends_the_latent_once(sd1_bundle, learned, monkeypatch):
    """One image under guidance: the int8-cpu U-Net (shared prefix) gets the latent once for both
    conditions, and the image is the one two rows give."""
    g = Generator(sd1_bundle, profile="cpu", embeddings=[learned])
    assert g.bundle.shared_prefix and g.profile.batch_perturbations
    rows, real = [], Generator._unet

    def spy(sess, x, t, ctx):
        rows.append((len(x), len(ctx["encoder_hidden_states"])))
        return real(sess, x, t, ctx)

    monkeypatch.setattr(Generator, "_unet", staticmethod(spy))
    once = np.asarray(g.generate("a photo of <thing>", steps=3, seed=2)[0], np.int16)
    assert set(rows) == {(1, 2)}
    rows.clear()
    monkeypatch.setattr(type(g.bundle), "shared_prefix", property(lambda self: False))
    twice = np.asarray(g.generate("a photo of <thing>", steps=3, seed=2)[0], np.int16)
    assert set(rows) == {(2, 2)}
    assert np.abs(once - twice).max() <= 1  # float32 rounding, at most one level of 255
