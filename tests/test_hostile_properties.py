"""Random manifests, checkpoints and safetensors headers fed to the loaders: each either loads or is
refused with a UserError (one line for the CLI), never another exception."""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zoodip_edge.bundle import load_bundle
from zoodip_edge.embeddings import load_embedding
from zoodip_edge.errors import UserError
from zoodip_edge.runtime.checkpoint import checkpoint_identity, load_checkpoint, save_checkpoint
from zoodip_edge.runtime.text import bundle_prompt_encoder, mmap_safetensors

TOY = Path(__file__).resolve().parents[1] / "zoodip_edge" / "toy" / "bundle"
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _paths(doc, prefix=()):
    """Every key path into a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield (*prefix, k)
            yield from _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield (*prefix, i)
            yield from _paths(v, (*prefix, i))


def _mutate(doc, data) -> object:
    """Replace, delete or retype one field somewhere in ``doc`` (drawn by hypothesis)."""
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = doc
        try:
            for key in path[:-1]:
                parent = parent[key]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            pass  # the path went away with an earlier change
    return doc


def _refused_or_loaded(fn, *args):
    try:
        return fn(*args)
    except UserError as e:
        assert str(e)
        return None


# ------------------------------------------------------------------------ manifests --

@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    return Path(shutil.copytree(TOY, tmp_path_factory.mktemp("manifests") / "bundle"))


@SETTINGS
@given(data=st.data())
def test_random_manifests_load_or_are_refused(bundle_dir, data):
    good = json.loads((TOY / "manifest.json").read_text())
    doc = _mutate(good, data) if data.draw(st.booleans()) else data.draw(json_values)
    (bundle_dir / "manifest.json").write_text(json.dumps(doc))
    bundle = _refused_or_loaded(load_bundle, bundle_dir, False)
    if bundle is not None:
        _refused_or_loaded(bundle_prompt_encoder, bundle)


# ---------------------------------------------------------------------- checkpoints --

def _state(d: int = 8, tau: int = 4) -> dict:
    rng = np.random.default_rng(0)
    return {"identity": json.dumps({"seed": 0}), "last_loss": 0.5, "start": "dog", "theta0": rng.standard_normal(d),
            "optimizer": {"theta": rng.standard_normal(d), "step": 3, "rng": np.random.default_rng(1).bit_generator.state,
                          "adam": {"m": np.zeros(d), "v": np.ones(d), "t": 3},
                          "sg": {"buffer": np.zeros((tau, d)), "count": 3, "p": np.zeros((0, d))},
                          "history": np.zeros((2, d))}}


@SETTINGS
@given(data=st.data())
def test_damaged_checkpoint_bytes_are_refused(tmp_path, data):
    path = tmp_path / "x.ckpt"
    save_checkpoint(path, _state())
    raw = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(raw) - 1))
        if kind == "flip":
            raw[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del raw[at:at + data.draw(st.integers(1, 64))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    path.write_bytes(bytes(raw))
    identity = checkpoint_identity(path)
    assert identity is None or isinstance(identity, dict)
    state = _refused_or_loaded(load_checkpoint, path)
    if state is not None:  # a flip that the checksum covers cannot pass; only bytes outside the data can
        assert json.dumps(state["identity"]) == json.dumps(_state()["identity"])


@pytest.fixture(scope="module")
def toy_personalizer(tmp_path_factory):
    from PIL import Image

    from zoodip_edge.runtime.personalize import Personalizer, Settings

    folder = tmp_path_factory.mktemp("toy-photos")
    for i in range(2):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return Personalizer(TOY, folder, "<x>", "shape", settings=Settings(search_init=False), profile="cpu")


@SETTINGS
@given(data=st.data())
def test_checkpoint_states_written_by_hand_resume_or_are_refused(toy_personalizer, tmp_path_factory, data):
    """A checkpoint with a valid checksum whose fields are anything: the resume checks them."""
    p = toy_personalizer
    path = tmp_path_factory.mktemp("ckpt") / "x.ckpt"
    p.save_checkpoint(path)
    state = load_checkpoint(path)
    tree = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in state.items() if k != "optimizer"}
    tree["optimizer"] = json.loads(json.dumps(state["optimizer"], default=lambda a: a.tolist()))
    mutated = _mutate(tree, data)
    if isinstance(mutated, dict):  # arrays come back as arrays where they were lists of numbers
        mutated = _arrays(mutated)
    save_checkpoint(path, mutated if isinstance(mutated, dict) else {"identity": mutated})
    before = p.optimizer.state_dict()
    _refused_or_loaded(p.load_checkpoint, path)
    p.optimizer.load_state_dict(before)


def _arrays(tree):
    if isinstance(tree, dict):
        return {k: _arrays(v) for k, v in tree.items()}
    if isinstance(tree, list) and tree and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in tree):
        return np.asarray(tree, dtype=np.float64)
    if isinstance(tree, list) and tree and all(isinstance(x, list) for x in tree):
        try:
            return np.asarray(tree, dtype=np.float64)
        except (ValueError, TypeError):
            return tree
    return tree


# --------------------------------------------------------------- safetensors headers --

dtypes = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "Q99", ""])
dims = st.integers(-3, 2**63)
headers = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(st.one_of(dims, st.integers(0, 8)), max_size=3),
                           "data_offsets": st.lists(st.one_of(dims, st.integers(0, 64)), min_size=0, max_size=3)})
    | json_values,
    max_size=3,
)


@st.composite
def near_valid_headers(draw) -> dict:
    """A tensor whose size agrees with its offsets, which may still point outside the file."""
    shape = draw(st.lists(st.integers(0, 6), min_size=1, max_size=2))
    start = draw(st.integers(0, 80))
    size = int(np.prod(shape)) * 4 + draw(st.sampled_from([0, 0, 0, -4, 4]))
    return {draw(st.text(min_size=1, max_size=4)): {"dtype": "F32", "shape": shape, "data_offsets": [start, start + size]}}


@SETTINGS
@given(header=near_valid_headers() | headers | json_values, data=st.binary(max_size=96), length=st.none() | st.integers(0, 2**64 - 1),
       metadata=st.none() | st.dictionaries(st.text(max_size=8), json_values, max_size=2))
def test_random_safetensors_headers_are_refused(tmp_path_factory, header, data, length, metadata):
    if isinstance(header, dict) and metadata is not None:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    _refused_or_loaded(load_embedding, path)
    _refused_or_loaded(load_checkpoint, path)
    assert checkpoint_identity(path) is None or isinstance(checkpoint_identity(path), dict)
    for name in (header if isinstance(header, dict) else ["x"]):
        _refused_or_loaded(mmap_safetensors, path, name)
