"""Weight-only QDQ: where ORT runs each DequantizeLinear (how long the fp32 weights live)."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from zoodip_edge.export.graph_ops import weights_first
from zoodip_edge.export.quantize import block_int8_matmuls, drop_repeated_nodes, unique_node_names, weight_only_qdq
from zoodip_edge.recipes import KEEP_DEQUANTIZED


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


def executed_order(model, tmp_path, shape=(1, 8, 8, 8)) -> list[str]:
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    for k, v in KEEP_DEQUANTIZED.items():  # as the bundles' session config: no QDQ fusion
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones(shape, np.float32)})
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
    q, first = weights_first(q)
    assert first == 6
    order = executed_order(q, tmp_path)
    dq = [i for i, name in enumerate(order) if name.endswith("_DequantizeLinear")]
    assert len(dq) == 6, order
    for i in dq:
        weight = order[i].removesuffix("_DequantizeLinear")
        assert order[i + 1] == f"conv{weight[1:]}", f"{order[i]} does not run right before its Conv: {order}"


def matmul_like(d: int = 32):
    """unet_like's branching with MatMuls (block-wise dequantized weights)."""
    rng = np.random.default_rng(0)
    mm = [("x", "w0", "a"), ("sa", "w1", "b"), ("sb", "w2", "cc"), ("k1", "w3", "u1"), ("k0", "w4", "u0"), ("k0", "w5", "sc")]
    nodes = []
    for i, (x, w, y) in enumerate(mm):
        nodes.append(helper.make_node("MatMul", [x, w], [y], name=f"mm{i}"))
        nodes += {"a": [helper.make_node("Sigmoid", ["a"], ["sa"])], "b": [helper.make_node("Sigmoid", ["b"], ["sb"])],
                  "cc": [helper.make_node("Add", ["cc", "b"], ["k1"])], "u1": [helper.make_node("Add", ["u1", "a"], ["k0"])]}.get(y, [])
    nodes.append(helper.make_node("Add", ["u0", "sc"], ["y"]))
    inits = [numpy_helper.from_array((0.2 * rng.standard_normal((d, d))).astype(np.float32), w) for _, w, _ in mm]
    g = helper.make_graph(nodes, "matmul_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


def test_weights_first_runs_each_block_dequantization_right_before_its_matmul(tmp_path):
    """block_int8_matmuls lists each DequantizeLinear next to its MatMul; weights_first (which
    quantize() runs last) moves them to the front, so that ORT runs each right before its MatMul
    instead of early (the SDXL U-Net held 2.3 GB of dequantized weights at once)."""
    q, n = block_int8_matmuls(matmul_like())
    assert n == 6
    before = np.asarray(ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
                        .run(None, {"x": np.ones((4, 32), np.float32)})[0])
    q, first = weights_first(q)
    assert first == 6 and all(node.op_type == "DequantizeLinear" for node in q.graph.node[:6])
    order = executed_order(q, tmp_path, shape=(4, 32))
    dq = [i for i, name in enumerate(order) if name.endswith(".dq")]
    assert len(dq) == 6, order
    for i in dq:
        assert order[i + 1].split("/")[0] == order[i].removesuffix(".dq"), f"{order[i]} does not run right before its MatMul: {order}"
    after = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones((4, 32), np.float32)})[0]
    np.testing.assert_array_equal(after, before)  # the same computation


def test_weights_first_keeps_chains_in_order_and_leaves_activation_nodes_alone():
    """A node reading a weight-only node's output is weight-only too; the rest keep their order."""
    nodes = [helper.make_node("Sigmoid", ["x"], ["s"], name="act0"),
             helper.make_node("Transpose", ["w"], ["wt"], name="w0"),
             helper.make_node("Neg", ["wt"], ["wn"], name="w1"),
             helper.make_node("MatMul", ["s", "wn"], ["m"], name="act1"),
             helper.make_node("Constant", [], ["c"], name="w2", value=numpy_helper.from_array(np.ones(2, np.float32))),
             helper.make_node("Add", ["m", "c"], ["y"], name="act2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.eye(2, dtype=np.float32), "w")])
    m, first = weights_first(helper.make_model(g))
    assert first == 3
    assert [n.name for n in m.graph.node] == ["w0", "w1", "w2", "act0", "act1", "act2"]


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


def _tie_weights(k: int, n: int = 48) -> np.ndarray:
    """Random weights, plus blocks where the rounding rule and the scale's sign show."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    # largest value 1 (scale -1/128): every j/256 lands on a half, where ORT rounds away from zero
    w[:32, :8] = rng.integers(-255, 256, (32, 8)) / 256
    w[0, :8] = 1
    w[1, :4] = -1  # |max| == |min|: the negative one sets the scale
    w[32:64, 8] = 0  # a block of zeros
    w[32, 9], w[33:64, 9] = -0.0, 0.0  # ... whose first zero is negative
    return w


@pytest.mark.parametrize("k", [96, 80])  # 80: a partial last block
def test_block_int8_matmuls_hold_the_weights_matmulnbits_held(k, tmp_path):
    """int8-cpu quantizes MatMul weights itself (block_int8_matmuls); they are, bit for bit, the
    dequantized weights of ORT's 8-bit MatMulNBits (what int8-cpu-fast holds, and what int8-cpu
    bundles were made from before), and ORT reads the block-wise DequantizeLinear as meant."""
    import onnx

    from zoodip_edge.export.quantize import (
        FLOAT_COMPUTE,
        KEEP_DEQUANTIZED,
        block_int8_matmuls,
        blockwise_int8,
        matmul_nbits8,
    )

    w = _tie_weights(k)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    nbits, _ = matmul_nbits8(onnx.ModelProto.FromString(model.SerializeToString()))
    dq, count = block_int8_matmuls(onnx.ModelProto.FromString(model.SerializeToString()))
    assert count == 1 and [n.op_type for n in dq.graph.node] == ["DequantizeLinear", "MatMul"]
    (q_name, q), (s_name, scale) = [(i.name, numpy_helper.to_array(i)) for i in dq.graph.initializer]
    assert q.dtype == np.int8 and q.shape == (k, 48) and scale.dtype == np.float32 and scale.shape == (-(-k // 32), 48)
    assert [q_name, s_name] == list(dq.graph.node[0].input), "no zero point: symmetric"
    q_ref, scale_ref = blockwise_int8(w)
    assert np.array_equal(q, q_ref) and scale.tobytes() == scale_ref.tobytes()
    assert (scale[0, :4] == 1 / 128).all() and (scale[0, 4:8] == -1 / 128).all()  # a tie takes the negative one
    assert np.signbit(scale[1, 8]) and not np.signbit(scale[1, 9]) and (q[32:64, 8:10] == 0).all()

    # a MatMul with the identity as input hands back its dequantized weights exactly
    eye = np.eye(k, dtype=np.float32)
    held = _session(nbits, FLOAT_COMPUTE).run(None, {"x": eye})[0]
    ours = q.astype(np.float32) * np.repeat(scale, 32, axis=0)[:k]
    assert np.array_equal(ours, held), np.abs(ours - held).max()
    assert np.array_equal(_session(dq, {**FLOAT_COMPUTE, **KEEP_DEQUANTIZED}).run(None, {"x": eye})[0], held)
    # the session config is what keeps them apart: without it ORT fuses the pair at load
    assert "MatMulNBits" not in _optimized_ops(dq, {**FLOAT_COMPUTE, **KEEP_DEQUANTIZED}, tmp_path)
    assert "MatMulNBits" in _optimized_ops(dq, FLOAT_COMPUTE, tmp_path)


def test_blockwise_int8_rounds_halves_up():
    """The rule written out for two blocks of largest magnitude 1: q is -128 v where 1 is the
    largest value (scale -1/128), 128 v where -1 is as large (scale 1/128), rounded with halves up
    (MLAS rounds q + 128, never negative, away from zero) and clamped to [-128, 127]."""
    from zoodip_edge.export.quantize import blockwise_int8

    w = np.zeros((32, 2), np.float32)
    w[:6, 0] = [1, 3 / 256, -3 / 256, 1 / 256, 0.5, 127.5 / 128]  # -128 v: -128, -1.5, 1.5, -0.5, -64, -127.5
    w[:6, 1] = [1, -1, 3 / 256, -3 / 256, 1 / 256, 127.5 / 128]  # 128 v: 128, -128, 1.5, -1.5, 0.5, 127.5
    q, scale = blockwise_int8(w)
    assert scale.tolist() == [[-1 / 128, 1 / 128]]
    assert q[:6].T.tolist() == [[-128, -1, 2, 0, -64, -127], [127, -128, 2, -1, 1, 127]]


def test_every_pass_a_recipe_names_exists():
    from zoodip_edge.export.quantize import PASSES, RECIPES

    for recipe in RECIPES.values():
        for graph, passes in recipe.passes.items():
            assert set(passes) <= set(PASSES), (recipe.name, graph, set(passes) - set(PASSES))
    # int8-cpu quantizes MatMul weights itself; int8-cpu-fast keeps ORT's MatMulNBits for its int8 compute
    assert all("matmulnbits_int8" not in passes for passes in RECIPES["int8-cpu"].passes.values())
    assert RECIPES["int8-cpu-fast"].passes_for("unet")[-1] == "int8_compute_matmuls"
