"""The export's Attention -> MultiHeadAttention rewrite: same numbers, and only where it applies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from zoodip_edge.export.attention import fuse_attention

from conftest import export_once


def _graph(heads: int, dim: int, kv_len: int | str, **attention_attrs) -> onnx.ModelProto:
    """What the exporter emits: [B, S, heads, dim] tensors transposed into the 4-D Attention op."""
    def bshd(name, length):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", length, heads, dim])

    def bhsd(name, length):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", heads, length, dim])

    nodes = [helper.make_node("Transpose", [x], [x + "t"], perm=[0, 2, 1, 3]) for x in "qkv"]
    nodes.append(helper.make_node("Attention", ["qt", "kt", "vt"], ["o"], **attention_attrs))
    nodes.append(helper.make_node("Transpose", ["o"], ["out"], perm=[0, 2, 1, 3]))
    g = helper.make_graph(nodes, "g", [bshd("q", 64), bshd("k", kv_len), bshd("v", kv_len)], [bshd("out", 64)],
                          value_info=[bhsd("qt", 64), bhsd("kt", kv_len), bhsd("vt", kv_len), bhsd("o", 64)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])


def _run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


@pytest.mark.parametrize("kv_len", [64, 7], ids=["self", "cross"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_rewrite_computes_the_same_attention(kv_len, scale):
    heads, dim = 4, 8
    attrs = {} if scale is None else {"scale": scale}
    model = _graph(heads, dim, kv_len, **attrs)
    rng = np.random.default_rng(0)
    feed = {"q": rng.standard_normal((2, 64, heads, dim), dtype=np.float32),
            "k": rng.standard_normal((2, kv_len, heads, dim), dtype=np.float32),
            "v": rng.standard_normal((2, kv_len, heads, dim), dtype=np.float32)}
    expected = _run(model, feed)
    fused, count = fuse_attention(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1
    ops = [n.op_type for n in fused.graph.node]
    assert "Attention" not in ops and "MultiHeadAttention" in ops
    np.testing.assert_allclose(_run(fused, feed), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attrs", [{"is_causal": 1}, {"softcap": 5.0}], ids=["causal", "softcap"])
def test_attention_that_differs_is_left_alone(attrs):
    fused, count = fuse_attention(_graph(4, 8, 64, **attrs))
    assert count == 0 and "Attention" in [n.op_type for n in fused.graph.node]


def test_unknown_head_count_is_left_alone():
    model = _graph(4, 8, 64)
    del model.graph.value_info[:]  # no shapes: heads cannot be read
    assert fuse_attention(model)[1] == 0


@pytest.mark.slow  # a full export or a trained run
def test_exported_unet_uses_multi_head_attention(sd1_pipeline, work):
    out, m = export_once(sd1_pipeline, "int8-cpu", work)
    ops = [n.op_type for n in onnx.load(str(out / m["components"]["unet"]["path"])).graph.node]
    assert "Attention" not in ops
    assert ops.count("MultiHeadAttention") == m["recipe"]["graphs"]["unet"]["multi_head_attention"] > 0
