"""The int8-cpu recipes' rewrite of token-side 1x1 and small 3x3 convolutions into MatMuls:
same numbers, only where it applies, and the MatMul path quantizes them."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoodip_edge.export.conv_matmul import conv_matmuls
from zoodip_edge.export.quantize import int8_matmul_compute, matmul_nbits8

C = 32


def _graph(rng: np.random.Generator, size: int) -> onnx.ModelProto:
    """A transformer's proj_in / proj_out around token-side work, a resnet shortcut and two 3x3
    convolutions, one strided: float, as the exporter writes them."""
    def w(name, shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    def i64(name, values):
        return numpy_helper.from_array(np.array(values, np.int64), name)

    nodes = [
        helper.make_node("Conv", ["x", "w_in", "b_in"], ["c_in"], name="proj_in", kernel_shape=[1, 1]),
        helper.make_node("Transpose", ["c_in"], ["t_in"], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", ["t_in", "tokens"], ["h"]),
        helper.make_node("Relu", ["h"], ["h2"]),
        helper.make_node("Reshape", ["h2", "image_hwc"], ["h3"]),
        helper.make_node("Transpose", ["h3"], ["t_out"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t_out", "w_out", "b_out"], ["c_out"], name="proj_out", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["c_out", "w_sc"], ["sc"], name="shortcut", kernel_shape=[1, 1]),  # image to image: kept
        helper.make_node("Conv", ["sc", "w_3", "b_3"], ["c3"], name="small3x3", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["c3", "w_s"], ["y"], name="strided", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]),
    ]
    inits = [w("w_in", (C, C, 1, 1)), w("b_in", (C,)), w("w_out", (C, C, 1, 1)), w("b_out", (C,)), w("w_sc", (48, C, 1, 1)),
             w("w_3", (C, 48, 3, 3)), w("b_3", (C,)), w("w_s", (C, C, 3, 3)),
             i64("tokens", [0, size * size, C]), i64("image_hwc", [0, size, size, C])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", C, size, size])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", C, size // 2, size // 2])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.ModelProto.FromString(model.SerializeToString())


@pytest.mark.parametrize("size, im2col", [(8, 1), (16, 0)])
def test_rewrite_computes_the_same_function(size, im2col):
    rng = np.random.default_rng(0)
    model = _graph(rng, size)
    rewritten, counts = conv_matmuls(_copy(model))
    assert counts == {"1x1": 2, "3x3_im2col": im2col}  # proj_in, proj_out; the 3x3 only at 8x8
    convs = sorted(n.name for n in rewritten.graph.node if n.op_type == "Conv")
    assert convs == (["shortcut", "strided"] if im2col else ["shortcut", "small3x3", "strided"])
    for batch in (1, 3):
        x = rng.standard_normal((batch, C, size, size)).astype(np.float32)
        expected, got = _run(model, x), _run(rewritten, x)
        assert np.abs(got - expected).max() <= 1e-5 * np.abs(expected).max()


def test_rewritten_convolutions_become_int8_matmuls():
    """The MatMul path takes them: MatMulNBits with int8 weights, int8 compute where asked."""
    rng = np.random.default_rng(1)
    model = _graph(rng, 8)
    rewritten, _ = conv_matmuls(_copy(model))
    quantized, counts = matmul_nbits8(rewritten)
    assert counts["MatMul"] == 3
    quantized, changed = int8_matmul_compute(quantized, keep_float=())
    assert changed == 3
    x = rng.standard_normal((2, C, 8, 8)).astype(np.float32)
    expected, got = _run(model, x), _run(quantized, x)
    assert 0 < np.linalg.norm(got - expected) / np.linalg.norm(expected) < 0.05
