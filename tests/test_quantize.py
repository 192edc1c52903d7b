"""Weight-only QDQ: where ORT runs each DequantizeLinear (how long the fp32 weights live)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoodip_edge.export.quantize import drop_repeated_nodes, unique_node_names, weight_only_qdq


def unet_like(c: int = 8):
    """Down path, concatenated skips, an up path and a 1x1 shortcut: the branching that makes
    ORT's default order hoist DequantizeLinear nodes listed next to their Conv."""
    rng = np.random.default_rng(0)

    def w(name, cin, k=3):
        return numpy_helper.from_array((0.2 * rng.standard_normal((c, cin, k, k))).astype(np.float32), name)

    pads = {"pads": [1, 1, 1, 1]}
    nodes = [helper.make_node("Conv", ["x", "w0"], ["a"], name="conv0", **pads),
             helper.make_node("Sigmoid", ["a"], ["sa"]),
             helper.make_node("Conv", ["sa", "w1"], ["b"], name="conv1", **pads),
             helper.make_node("Sigmoid", ["b"], ["sb"]),
             helper.make_node("Conv", ["sb", "w2"], ["cc"], name="conv2", **pads),
             helper.make_node("Concat", ["cc", "b"], ["k1"], axis=1),
             helper.make_node("Conv", ["k1", "w3"], ["u1"], name="conv3", **pads),
             helper.make_node("Concat", ["u1", "a"], ["k0"], axis=1),
             helper.make_node("Conv", ["k0", "w4"], ["u0"], name="conv4", **pads),
             helper.make_node("Conv", ["k0", "w5"], ["sc"], name="conv5"),
             helper.make_node("Add", ["u0", "sc"], ["y"])]
    inits = [w("w0", c), w("w1", c), w("w2", c), w("w3", 2 * c), w("w4", 2 * c), w("w5", 2 * c, 1)]
    g = helper.make_graph(nodes, "unet_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def executed_order(model, tmp_path) -> list[str]:
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((1, 8, 8, 8), np.float32)})
    path = sess.end_profiling()
    events = json.load(open(path))
    os.remove(path)
    return [e["name"].removesuffix("_kernel_time") for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def test_each_weight_is_dequantized_right_before_its_conv(tmp_path):
    """Otherwise ORT runs DequantizeLinear nodes early and their fp32 weights live until their Conv
    (listed next to their Conv, four of these six ran before the first Conv)."""
    q, counts = weight_only_qdq(unet_like(), ("Conv",))
    assert counts == {"Conv": 6}
    order = executed_order(q, tmp_path)
    dq = [i for i, name in enumerate(order) if name.endswith("_DequantizeLinear")]
    assert len(dq) == 6, order
    for i in dq:
        weight = order[i].removesuffix("_DequantizeLinear")
        assert order[i + 1] == f"conv{weight[1:]}", f"{order[i]} does not run right before its Conv: {order}"


def test_repeated_node_names_are_made_unique():
    """onnxruntime 1.30's float16 converter named two Casts of one tensor alike; ORT then refused the graph."""
    nodes = [helper.make_node("Cast", ["x"], ["a"], name="x_cast", to=TensorProto.FLOAT),
             helper.make_node("Cast", ["x"], ["b"], name="x_cast", to=TensorProto.FLOAT),
             helper.make_node("Add", ["a", "b"], ["y"], name="x_cast_2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        refused = False
    except Exception:  # noqa: BLE001 - whichever error ORT raises for it
        refused = True
    names = [n.name for n in unique_node_names(model).graph.node]
    assert len(set(names)) == 3 and names[0] == "x_cast" and names[2] == "x_cast_2"
    out = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones(2, np.float32)})
    assert refused and np.allclose(out[0], 2.0)


def test_a_repeated_node_is_dropped_and_a_conflicting_one_refused():
    """onnxruntime 1.30's float16 converter inserted one Cast twice (both defining the same tensor)."""
    def model(second_to):
        nodes = [helper.make_node("Cast", ["x"], ["x32"], name="c1", to=TensorProto.FLOAT),
                 helper.make_node("Cast", ["x"], ["x32"], name="c2", to=second_to),
                 helper.make_node("Add", ["x32", "x32"], ["y"], name="add")]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])

    m = model(TensorProto.FLOAT)
    try:
        ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        refused = False
    except Exception:  # noqa: BLE001 - whichever error ORT raises for it
        refused = True
    fixed = drop_repeated_nodes(m)
    assert refused and [n.name for n in fixed.graph.node] == ["c1", "add"]
    out = ort.InferenceSession(fixed.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones(2, np.float16)})
    assert np.allclose(out[0], 2.0)
    with pytest.raises(ValueError, match="two different nodes define 'x32'"):
        drop_repeated_nodes(model(TensorProto.DOUBLE))


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(sys.platform != "linux", reason="reads RSS from /proc")
def test_rewrites_do_not_copy_the_weights_they_keep():
    """A rewrite ends in replace_nodes; it must drop what nothing reads without re-adding the rest.

    Re-adding copied every kept weight, and protobuf frees none of it until the model goes: an
    SD1.5 export held several copies of its U-Net (15.4 GB, docs/results/2026-11-28-epyc-avx512/export_memory.md).
    """
    from zoodip_edge.export.graph_ops import replace_nodes

    big = numpy_helper.from_array(np.ones((64, 1024, 1024), np.float32), "big")  # 256 MiB
    small = numpy_helper.from_array(np.ones(4, np.float32), "unread")
    node = helper.make_node("Add", ["x", "big"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 1024, 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 1024, 1024])], [big, small])
    model = helper.make_model(graph)
    del big, graph
    before = _rss_mb()
    for _ in range(3):
        model = replace_nodes(model, list(model.graph.node))
    assert [i.name for i in model.graph.initializer] == ["big"]
    assert _rss_mb() - before < 128  # three copies would be 768 MiB


def _session(model, config: dict, optimized_path=None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    for k, v in config.items():
        so.add_session_config_entry(k, v)
    if optimized_path:
        so.optimized_model_filepath = str(optimized_path)
        so.log_severity_level = 3  # ORT warns that an NCHWc-optimized file is machine-specific
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _optimized_ops(model, config: dict, tmp_path) -> list[str]:
    """The op types of the graph ORT runs after its load-time optimizations."""
    import onnx

    _session(model, config, tmp_path / "optimized.onnx")
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("k", [96, 80])  # 80: the last block of 32 is padded in MatMulNBits
def test_dequantized_matmuls_compute_what_matmulnbits_computed(k, tmp_path):
    import onnx

    from zoodip_edge.export.quantize import (
        FLOAT_COMPUTE,
        KEEP_DEQUANTIZED,
        dequantized_matmuls,
        int8_matmul_compute,
        matmul_nbits8,
    )

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array((rng.standard_normal((k, 48)) / np.sqrt(k)).astype(np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"), helper.make_node("Relu", ["h"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    nbits, _ = matmul_nbits8(helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)]))
    dq, count = dequantized_matmuls(onnx.ModelProto.FromString(nbits.SerializeToString()))
    assert count == 1 and [n.op_type for n in dq.graph.node] == ["DequantizeLinear", "MatMul", "Relu"]
    int8 = {i.name: numpy_helper.to_array(i) for i in dq.graph.initializer}
    assert [a.dtype for a in int8.values()] == [np.int8, np.float32], "same int8 weights and scales, nothing else"
    x = rng.standard_normal((3, 5, k)).astype(np.float32)

    ref = _session(nbits, FLOAT_COMPUTE).run(None, {"x": x})[0]
    got = _session(dq, {**FLOAT_COMPUTE, **KEEP_DEQUANTIZED}).run(None, {"x": x})[0]
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    # the session config is what keeps them apart: without it ORT fuses the pair back at load
    assert "MatMulNBits" not in _optimized_ops(dq, {**FLOAT_COMPUTE, **KEEP_DEQUANTIZED}, tmp_path)
    assert "MatMulNBits" in _optimized_ops(dq, FLOAT_COMPUTE, tmp_path)
    # int8 compute (int8-cpu-fast) stays MatMulNBits
    assert dequantized_matmuls(int8_matmul_compute(nbits, keep_float=())[0])[1] == 0
