"""int8-cpu's split of a projection that is only split (GEGLU): one projection per part, the same
numbers before and after quantization, and nothing else touched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoodip_edge.export.projections import split_projections
from zoodip_edge.export.quantize import FLOAT_COMPUTE, matmul_nbits8

from conftest import shared_bundle

D, F = 64, 256


def _geglu(split_sizes: list[int] | None = None, shared: bool = False) -> onnx.ModelProto:
    """x -> MatMul -> +bias -> Split(last axis) -> a * gelu(b) -> MatMul -> y (SD1.5's feed-forward)."""
    rng = np.random.default_rng(0)
    w = lambda name, shape: numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)  # noqa: E731
    inits = [w("w_in", (D, F)), w("b_in", (F,)), w("w_out", (F // 2, D))]
    if split_sizes is None:
        split = helper.make_node("Split", ["h"], ["a", "b"], axis=-1, num_outputs=2)
    else:
        inits.append(numpy_helper.from_array(np.array(split_sizes, np.int64), "sizes"))
        split = helper.make_node("Split", ["h", "sizes"], ["a", "b"], axis=2)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["p"]), helper.make_node("Add", ["p", "b_in"], ["h"]), split,
             helper.make_node("Gelu", ["b"], ["g"]), helper.make_node("Mul", ["a", "g"], ["ag"]),
             helper.make_node("MatMul", ["ag", "w_out"], ["y0"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 16, D])]
    if shared:  # the projection's output is read by something besides the Split: must stay whole
        nodes += [helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0),
                  helper.make_node("Add", ["y0", "s"], ["y"])]
    else:
        nodes.append(helper.make_node("Identity", ["y0"], ["y"]))
    g = helper.make_graph(nodes, "ff", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16, D])], outputs, inits,
                          value_info=[helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", 16, F])])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    for k, v in FLOAT_COMPUTE.items():
        so.add_session_config_entry(k, v)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


@pytest.mark.parametrize("sizes", [None, [F // 2, F // 2]])
def test_split_projection_computes_the_same(sizes):
    model = _geglu(sizes)
    split, count = split_projections(_copy(model))
    assert count == 1
    ops = [n.op_type for n in split.graph.node]
    assert "Split" not in ops and ops.count("MatMul") == 3 and ops.count("Add") == 2
    x = np.random.default_rng(1).standard_normal((2, 16, D)).astype(np.float32)
    assert np.abs(_run(split, x) - _run(model, x)).max() <= 1e-6 * np.abs(_run(model, x)).max()
    # quantized after the split, each part holds the whole's blocks (blocks run along K): here as
    # int8-cpu-fast's MatMulNBits; test_export checks int8-cpu's exported parts column for column
    whole, parts = matmul_nbits8(_copy(model))[0], matmul_nbits8(split)[0]
    assert [n.op_type for n in parts.graph.node].count("MatMulNBits") == 3
    assert np.abs(_run(parts, x) - _run(whole, x)).max() <= 1e-6 * np.abs(_run(whole, x)).max()


@pytest.mark.parametrize("case", ["unequal", "shared"])
def test_other_splits_are_left_alone(case):
    # (the unequal graph would not run: only what the rewrite decides is looked at)
    model = _geglu([F // 4, 3 * F // 4]) if case == "unequal" else _geglu(shared=True)
    out, count = split_projections(_copy(model))
    assert count == 0 and [n.op_type for n in out.graph.node] == [n.op_type for n in model.graph.node]


def test_int8_cpu_bundle_splits_the_unet_feed_forwards(sd1_pipeline, work):
    _, manifest = shared_bundle(sd1_pipeline, "int8-cpu", work)
    graphs = manifest["recipe"]["graphs"]
    assert graphs["unet"]["split_projections"] >= 1  # one GEGLU per transformer block
    assert graphs["text_encoder"]["split_projections"] == 0  # CLIP's MLP has no split
