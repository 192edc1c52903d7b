"""The export's memory levers change memory, not the bundle: weights left on disk until a pass
reads them give the same bytes as graphs loaded whole, and torch is gone before the graphs load."""

from __future__ import annotations

import gc
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from zoodip_edge.export.graph_ops import LAZY_MIN_ELEMENTS, load_lazily, load_remaining, weight, weights_in
from zoodip_edge.export.projections import split_projections
from zoodip_edge.export.quantize import block_int8_matmuls


def _graph_on_disk(folder, k: int = 320, n: int = 256):
    """x @ W1 @ W2 + b with W1, W2 over the lazy threshold, saved with external data as the exporter saves."""
    assert k * n >= LAZY_MIN_ELEMENTS
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((k, n), dtype=np.float32), rng.standard_normal((n, k), dtype=np.float32)
    b = rng.standard_normal(k, dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
         helper.make_node("Add", ["y0", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, k])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="model.onnx.data",
                    size_threshold=0)
    return path, {"w1": w1, "w2": w2, "b": b}


def test_large_weights_stay_on_disk_until_read(tmp_path):
    path, values = _graph_on_disk(tmp_path)
    model = load_lazily(path)
    inits = {i.name: i for i in model.graph.initializer}
    assert uses_external_data(inits["w1"]) and uses_external_data(inits["w2"])
    assert not uses_external_data(inits["b"])  # small: read at load
    with pytest.raises(RuntimeError, match="on disk"):
        weight(inits["w1"])
    with weights_in(tmp_path):
        np.testing.assert_array_equal(weight(inits["w1"]), values["w1"])
    assert uses_external_data(inits["w1"])  # reading did not load it into the model


def test_lazy_pass_saves_the_same_bytes_as_a_whole_graph(tmp_path):
    path, _ = _graph_on_disk(tmp_path)
    whole, _ = block_int8_matmuls(onnx.load(str(path)))
    with weights_in(tmp_path):
        lazy, n = block_int8_matmuls(load_lazily(path))
    assert n == 2
    assert load_remaining(lazy, tmp_path).SerializeToString() == whole.SerializeToString()
    # with nothing replaced, the remaining weights load as onnx.load loads them
    assert load_remaining(load_lazily(path), tmp_path).SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_split_parts_stay_on_disk_and_save_the_same_bytes(tmp_path):
    # int8-cpu's first pass: a projection only split in halves (GEGLU) becomes one per half
    k, n = 320, 256
    assert k * n >= LAZY_MIN_ELEMENTS
    w = np.random.default_rng(0).standard_normal((k, 2 * n), dtype=np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Split", ["h"], ["a", "b"], axis=-1, num_outputs=2),
         helper.make_node("Mul", ["a", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        [numpy_helper.from_array(w, "w")])
    path = tmp_path / "model.onnx"
    onnx.save_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)]), path, save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    whole, count = split_projections(onnx.load(str(path)))
    with weights_in(tmp_path):
        lazy, _ = split_projections(load_lazily(path))
    parts = [i for i in lazy.graph.initializer if ".part" in i.name]
    assert count == 1 and len(parts) == 2 and all(uses_external_data(i) for i in parts)  # never in protobuf's memory
    kept = load_remaining(onnx.ModelProto.FromString(lazy.SerializeToString()), tmp_path)  # no pass replaced them
    assert kept.SerializeToString() == whole.SerializeToString()
    with weights_in(tmp_path):
        lazy, quantized = block_int8_matmuls(lazy)
    assert quantized == 2
    assert load_remaining(lazy, tmp_path).SerializeToString() == block_int8_matmuls(whole)[0].SerializeToString()


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_export_with_weights_on_disk_is_byte_identical(family, tmp_path):
    import torch

    from zoodip_edge.export import _export
    from zoodip_edge.export.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    pipe = tmp_path / "pipe"
    build_tiny_sdxl_pipeline(pipe) if family == "sdxl" else build_tiny_pipeline(pipe)
    gc.collect()
    torch_alive = []

    def progress(msg: str) -> None:
        if msg.startswith("quantizing unet"):  # the U-Net's graph loads next: no torch weight may be alive
            gc.collect()  # (onnxscript's matchers held them through the exported graph: graphs.forget_last_match)
            torch_alive.append(sum(isinstance(o, torch.nn.Parameter) for o in gc.get_objects()))

    lazy = _export(str(pipe), tmp_path / "lazy", "int8-cpu", None, False, False, None, progress)
    whole = _export(str(pipe), tmp_path / "whole", "int8-cpu", None, False, False, None, lambda m: None, lazy_weights=False)
    assert torch_alive == [0]
    for name, entry in lazy["components"].items():
        assert entry["sha256"] == whole["components"][name]["sha256"], name
    assert lazy["verification"] == whole["verification"]


def _rss_file_kb() -> int:
    status = open("/proc/self/status").read()
    return int(status.split("RssFile:")[1].split()[0])


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status; MADV_PAGEOUT is Linux's")
def test_released_weights_leave_memory_and_come_back_unchanged(tmp_path):
    """diffusers maps the fp32 weight files; release_weights hands their pages back to the OS and the
    next read brings back the same values (a U-Net of 16 MB of weights, written here)."""
    import torch
    from diffusers import UNet2DConditionModel

    from zoodip_edge.export.load import release_weights

    torch.manual_seed(0)
    UNet2DConditionModel(block_out_channels=(64, 128), layers_per_block=1, cross_attention_dim=32, sample_size=8,
                         down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                         up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(tmp_path)
    unet = UNet2DConditionModel.from_pretrained(tmp_path)
    size_kb = sum(p.numel() * 4 for p in unet.parameters()) // 1024
    before = [p.detach().clone() for p in unet.parameters()]  # reads every page (and keeps a copy)
    read = _rss_file_kb()
    release_weights(unet)
    released = _rss_file_kb()
    assert read - released > size_kb // 2, (read, released, size_kb)
    assert all(torch.equal(a, p) for a, p in zip(before, unet.parameters()))  # read again, the same
    assert _rss_file_kb() - released > size_kb // 2
