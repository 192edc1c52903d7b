"""Learned-embedding files (zoodip_edge.embeddings).

Most tests use NumPy and safetensors only. Tests that say so import torch (to write real
``torch.save`` files) or diffusers (to load our files with its own loader); they are
skipped where those are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from zoodip_edge import embeddings
from zoodip_edge.embeddings import load_embedding, save_embedding
from zoodip_edge.errors import UserError

D = 32


def rand(*shape, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def file_metadata(path: Path) -> dict:
    with safe_open(str(path), framework="numpy") as f:
        return f.metadata()


# ------------------------------------------------------------------ round trips


def test_diffusers_round_trip_single_vector(tmp_path):
    path = tmp_path / "learned_embeds.safetensors"
    vec = rand(D)
    meta = {"bundle_sha256": "ab" * 32, "steps": 500, "mu": 1e-3, "hp": {"lr": 0.01, "n": 4}, "ok": True}
    save_embedding(path, "<dog>", vec, meta)

    # the layout, read by the reference reader
    raw = load_file(str(path))
    assert list(raw) == ["<dog>"]
    assert raw["<dog>"].dtype == np.float32 and raw["<dog>"].shape == (1, D)
    stored = file_metadata(path)
    assert stored == {
        "name": "<dog>",
        "bundle_sha256": "ab" * 32,
        "steps": "500",
        "mu": "0.001",
        "hp": '{"lr": 0.01, "n": 4}',
        "ok": "true",
    }

    token, got, got_meta = load_embedding(path)
    assert token == "<dog>"
    assert np.array_equal(got, vec[None])
    assert got_meta == stored
    assert json.loads(got_meta["hp"]) == {"lr": 0.01, "n": 4}


def test_diffusers_round_trip_multi_vector(tmp_path):
    path = tmp_path / "e.safetensors"
    vec = rand(3, D).astype(np.float64)  # converted to float32
    save_embedding(path, "<cat>", vec)
    token, got, meta = load_embedding(path)
    assert token == "<cat>" and got.dtype == np.float32 and got.shape == (3, D)
    assert np.array_equal(got, vec.astype(np.float32))
    assert meta == {"name": "<cat>"}


def test_a1111_round_trip(tmp_path):
    path = tmp_path / "mydog.safetensors"
    vec = rand(2, D)
    save_embedding(path, "mydog", vec, {"steps": 10}, fmt="a1111")
    raw = load_file(str(path))
    assert list(raw) == ["emb_params"] and raw["emb_params"].shape == (2, D)
    assert raw["emb_params"].dtype == np.float32
    assert file_metadata(path) == {"name": "mydog", "steps": "10"}
    token, got, meta = load_embedding(path)
    assert token == "mydog" and np.array_equal(got, vec) and meta["steps"] == "10"


def test_sdxl_round_trip(tmp_path):
    path = tmp_path / "x.safetensors"
    vec = {"clip_l": rand(2, 768), "clip_g": rand(2, 1280, seed=1)}
    save_embedding(path, "<x>", vec)
    raw = load_file(str(path))
    assert sorted(raw) == ["clip_g", "clip_l"] and raw["clip_g"].shape == (2, 1280)
    token, got, _ = load_embedding(path)
    assert token == "<x>" and set(got) == {"clip_l", "clip_g"}
    assert np.array_equal(got["clip_l"], vec["clip_l"]) and np.array_equal(got["clip_g"], vec["clip_g"])
    with pytest.raises(ValueError, match="same number"):
        save_embedding(path, "<x>", {"clip_l": rand(1, 768), "clip_g": rand(2, 1280)})


def test_foreign_safetensors_layouts(tmp_path):
    # [d] vector (some hub concepts), fp16, and emb_params without a name
    save_file({"<a>": rand(D).astype(np.float16)}, str(tmp_path / "a.safetensors"))
    token, got, meta = load_embedding(tmp_path / "a.safetensors")
    assert token == "<a>" and got.shape == (1, D) and got.dtype == np.float32 and meta == {}
    save_file({"emb_params": rand(1, D)}, str(tmp_path / "b.safetensors"))
    assert load_embedding(tmp_path / "b.safetensors")[0] is None


def test_bf16_safetensors(tmp_path):
    # hand-made BF16 tensor: the top 16 bits of float32
    vals = np.array([[1.0, -2.5, 0.15625]], np.float32)
    header = json.dumps({"t": {"dtype": "BF16", "shape": [1, 3], "data_offsets": [0, 6]}}).encode()
    data = (vals.view(np.uint32) >> 16).astype("<u2").tobytes()
    path = tmp_path / "bf.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + data)
    assert np.array_equal(load_embedding(path)[1], vals)


# ------------------------------------------------------------------ saving: errors and atomicity


def test_save_argument_errors(tmp_path):
    with pytest.raises(UserError, match="safetensors"):
        save_embedding(tmp_path / "e.pt", "<t>", rand(D))
    with pytest.raises(UserError, match="token"):
        save_embedding(tmp_path / "e.safetensors", " ", rand(D))
    with pytest.raises(ValueError, match="shape"):
        save_embedding(tmp_path / "e.safetensors", "<t>", rand(1, 2, D))
    with pytest.raises(ValueError, match="NaN"):
        save_embedding(tmp_path / "e.safetensors", "<t>", np.full(D, np.nan))
    with pytest.raises(ValueError, match="fmt"):
        save_embedding(tmp_path / "e.safetensors", "<t>", rand(D), fmt="ckpt")
    with pytest.raises(ValueError, match="reserved"):
        save_embedding(tmp_path / "e.safetensors", "<t>", rand(D), {"name": "other"})
    assert list(tmp_path.iterdir()) == []


def test_save_creates_parent_folders(tmp_path):
    path = tmp_path / "runs" / "dog" / "learned_embeds.safetensors"
    save_embedding(path, "<dog>", rand(D))
    assert path.is_file()


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch, where):
    path = tmp_path / "learned_embeds.safetensors"

    def boom(*a, **kw):
        raise OSError(28, "No space left on device")

    if where == "write":
        real_fdopen = os.fdopen

        class HalfWriter:
            def __init__(self, f):
                self.f = f

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

            def write(self, data):
                self.f.write(data[: len(data) // 2])  # a partial file exists on disk now
                self.f.flush()
                boom()

            def __getattr__(self, name):
                return getattr(self.f, name)

        monkeypatch.setattr(embeddings.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    else:
        monkeypatch.setattr(embeddings.os, where, boom)

    with pytest.raises(UserError, match="No space left"):
        save_embedding(path, "<dog>", rand(D))
    assert not path.exists()
    assert list(tmp_path.iterdir()) == [], "no temp file may remain"


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "e.safetensors"
    save_embedding(path, "<old>", rand(D))
    before = path.read_bytes()

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(embeddings.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_embedding(path, "<new>", rand(D, seed=1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]


# ------------------------------------------------------------------ loading: errors


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_embedding(tmp_path / "nope.safetensors")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        load_embedding(tmp_path / "empty.safetensors")
    (tmp_path / "text.pt").write_text("hello, I am not an embedding\n")
    with pytest.raises(UserError, match="not an embedding file"):
        load_embedding(tmp_path / "text.pt")

    save_file({"a": rand(1, D), "b": rand(1, D)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(UserError, match="holds 2 tensors"):
        load_embedding(tmp_path / "two.safetensors")
    save_file({"<t>": rand(1, 2, D)}, str(tmp_path / "3d.safetensors"))
    with pytest.raises(UserError, match=r"shape \[1, 2, 32\]"):
        load_embedding(tmp_path / "3d.safetensors")
    save_file({"<t>": np.full((1, D), np.inf, np.float32)}, str(tmp_path / "inf.safetensors"))
    with pytest.raises(UserError, match="NaN or infinite"):
        load_embedding(tmp_path / "inf.safetensors")
    save_file({f"k{i}": rand(1) for i in range(50)}, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(UserError, match="not a textual-inversion embedding"):
        load_embedding(tmp_path / "ckpt.safetensors")
    good = tmp_path / "good.safetensors"
    save_embedding(good, "<t>", rand(D))
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:-10])
    with pytest.raises(UserError, match="cut.safetensors"):
        load_embedding(tmp_path / "cut.safetensors")


# ------------------------------------------------------------------ pickles: never executed


class Payload:
    """Unpickling this runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def zip_like_torch_save(path: Path, pkl: bytes) -> None:
    """The torch.save zip layout (archive/data.pkl, byteorder, version) around any pickle."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
        z.writestr("archive/data/0", b"\x00" * 4 * D)


@pytest.mark.skipif(os.name != "posix", reason="the payload uses a POSIX shell")
@pytest.mark.parametrize("container", ["plain", "protocol0", "torch-zip", "nested"])
def test_malicious_pickle_refused_and_not_run(tmp_path, container):
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    if container == "plain":
        path = tmp_path / "evil.pt"
        path.write_bytes(pickle.dumps(payload))
    elif container == "protocol0":
        path = tmp_path / "evil.bin"
        path.write_bytes(pickle.dumps({"<tok>": payload}, protocol=0))
    elif container == "torch-zip":
        path = tmp_path / "evil.pt"
        zip_like_torch_save(path, pickle.dumps({"<tok>": payload}, protocol=2))
    else:  # hidden behind globals our reader does allow
        from collections import OrderedDict

        path = tmp_path / "evil.pt"
        zip_like_torch_save(path, pickle.dumps(OrderedDict(a=[1, {"b": payload}]), protocol=2))

    with pytest.raises(UserError, match=r"refusing to load .*evil.*: it contains pickled code \((posix|os)\.system\)"):
        load_embedding(path)
    assert not marker.exists(), "the pickled payload ran"

    # control: the payload is live, an ordinary unpickler would have run it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))
    assert control.exists()


def test_plain_pickle_without_code_is_not_an_embedding(tmp_path):
    (tmp_path / "d.pt").write_bytes(pickle.dumps({"<tok>": [1.0, 2.0]}))
    with pytest.raises(UserError, match="not a torch.save file"):
        load_embedding(tmp_path / "d.pt")


# ------------------------------------------------------------------ torch-written files (import torch)


@pytest.fixture()
def torch():
    return pytest.importorskip("torch")


def test_torch_save_diffusers_bin(tmp_path, torch):
    t = torch.randn(1, D)
    torch.save({"<tok>": t}, tmp_path / "learned_embeds.bin")
    token, got, meta = load_embedding(tmp_path / "learned_embeds.bin")
    assert token == "<tok>" and meta == {}
    assert got.dtype == np.float32 and np.array_equal(got, t.numpy())


def test_torch_save_slice_of_a_table(tmp_path, torch):
    # diffusers' train script saves weight[first:last + 1]: a view whose storage is the whole table
    table = torch.randn(50, D)
    torch.save({"<tok>": table[7:9].detach()}, tmp_path / "view.bin")
    torch.save({"<tok>": table[3:5].t()}, tmp_path / "strided.bin")
    torch.save({"<tok>": table[7:9]}, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    assert np.array_equal(load_embedding(tmp_path / "view.bin")[1], table[7:9].numpy())
    assert np.array_equal(load_embedding(tmp_path / "strided.bin")[1], table[3:5].t().numpy())
    assert np.array_equal(load_embedding(tmp_path / "legacy.bin")[1], table[7:9].numpy())


def test_torch_save_half_and_bfloat16(tmp_path, torch):
    for dtype in (torch.float16, torch.bfloat16):
        t = torch.randn(2, D, dtype=dtype)
        torch.save({"<t>": t}, tmp_path / "h.pt")
        assert np.array_equal(load_embedding(tmp_path / "h.pt")[1], t.float().numpy())


def test_torch_save_a1111_pt(tmp_path, torch):
    vec = torch.nn.Parameter(torch.randn(2, D))  # A1111 trains a tensor with requires_grad
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": "mydog",
        "step": 1500,
        "sd_checkpoint": "e1441589a6",
        "sd_checkpoint_name": None,
    }
    torch.save(data, tmp_path / "mydog.pt")
    token, got, meta = load_embedding(tmp_path / "mydog.pt")
    assert token == "mydog" and np.array_equal(got, vec.detach().numpy())
    assert meta == {"name": "mydog", "step": "1500", "sd_checkpoint": "e1441589a6"}


def test_torch_module_objects_refused(tmp_path, torch):
    # the original textual_inversion repo pickled an nn.ParameterDict: a class, not a tensor
    pd = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.randn(1, D))})
    torch.save({"string_to_param": pd, "name": "x"}, tmp_path / "old.pt")
    with pytest.raises(UserError, match=r"pickled code \(torch\.nn\.modules\.container\.ParameterDict\)"):
        load_embedding(tmp_path / "old.pt")


def test_torch_multiple_tensors_refused(tmp_path, torch):
    torch.save({"a": torch.ones(1, D), "b": torch.ones(1, D)}, tmp_path / "two.pt")
    with pytest.raises(UserError, match="2 tensor"):
        load_embedding(tmp_path / "two.pt")


# ------------------------------------------------------------------ what diffusers reads


def _diffusers_textual_inversion_source() -> str | None:
    spec = importlib.util.find_spec("diffusers")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "loaders" / "textual_inversion.py"
    return path.read_text() if path.exists() else None


def test_layout_matches_diffusers_loader_source(tmp_path):
    """Our diffusers file is what diffusers/loaders/textual_inversion.py reads.

    ``load_textual_inversion_state_dicts`` reads ``learned_embeds.safetensors`` with
    ``safetensors.torch.load_file``; ``_retrieve_tokens_and_embeddings`` takes
    ``elif len(state_dict) == 1: loaded_token, embedding = next(iter(state_dict.items()))``
    and ``_extend_tokens_and_embeddings`` splits ``[k, d]`` into ``tok, tok_1, …``.
    """
    src = _diffusers_textual_inversion_source()
    if src is None:
        pytest.skip("diffusers not installed")
    assert 'TEXT_INVERSION_NAME_SAFE = "learned_embeds.safetensors"' in src
    assert "elif len(state_dict) == 1:" in src
    assert "loaded_token, embedding = next(iter(state_dict.items()))" in src
    assert 'embedding = state_dict["string_to_param"]["*"]' in src

    save_embedding(tmp_path / "learned_embeds.safetensors", "<dog>", rand(2, D))
    raw = load_file(str(tmp_path / "learned_embeds.safetensors"))
    assert len(raw) == 1
    (token, emb), = raw.items()
    assert token == "<dog>" and emb.dtype == np.float32 and emb.ndim == 2 and emb.shape == (2, D)


def test_diffusers_loads_our_file(tmp_path):
    """diffusers' own loader functions (this test imports diffusers and torch) on our files."""
    pytest.importorskip("torch")
    ti = pytest.importorskip("diffusers.loaders.textual_inversion")

    class Tokenizer:  # all the two static methods ask of a tokenizer
        added_tokens_encoder: dict = {}

        def get_vocab(self):
            return {}

    vec = rand(2, D)
    save_embedding(tmp_path / "learned_embeds.safetensors", "<dog>", vec, {"steps": 3})
    [state] = ti.load_textual_inversion_state_dicts([str(tmp_path)])  # the folder, as users pass it
    mixin = ti.TextualInversionLoaderMixin
    tokens, embs = mixin._retrieve_tokens_and_embeddings([None], [state], Tokenizer())
    tokens, embs = mixin._extend_tokens_and_embeddings(tokens, embs, Tokenizer())
    assert tokens == ["<dog>", "<dog>_1"]
    assert np.array_equal(np.stack([e.numpy() for e in embs]), vec)

    # the A1111 layout loads in diffusers when the token is given
    save_embedding(tmp_path / "mydog.safetensors", "mydog", vec[:1], fmt="a1111")
    [state] = ti.load_textual_inversion_state_dicts([str(tmp_path / "mydog.safetensors")],
                                                    weight_name="mydog.safetensors")
    tokens, embs = mixin._retrieve_tokens_and_embeddings(["mydog"], [state], Tokenizer())
    assert tokens == ["mydog"] and np.array_equal(embs[0].numpy(), vec[:1])
