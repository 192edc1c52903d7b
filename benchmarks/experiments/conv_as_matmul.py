# ruff: noqa: E701, E702  (a finished experiment, kept as it was written: several statements a line)
"""Single convolutions at SD1.5 sizes, batch 3, 2 threads: ORT Conv on int8 weights (DequantizeLinear,
as int8-cpu stores them) against the same convolution as a MatMulNBits (float compute, accuracy
level 0, and int8 compute, level 4). 3x3 ones at 8x8 as im2col MatMuls; 1x1 ones as the token-side
MatMul of a transformer's proj_in (Conv -> Transpose -> Reshape). An export pass
for both (conv_matmul.py, commit 61d794f) was measured and removed: docs/recipes.md says why.

    python -m benchmarks.experiments.conv_as_matmul

Medians of 10 runs, three rounds; "rel" is the output's relative difference from the Conv's
(the two store the weights on different int8 grids: per output channel, per block of 32).
"""
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from zoodip_edge.export.quantize import FLOAT_COMPUTE, int8_matmul_compute, matmul_nbits8, weight_only_qdq

rng = np.random.default_rng(0)
def sess(m, acc=None):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    for k, v in FLOAT_COMPUTE.items(): so.add_session_config_entry(k, v)
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
def model(nodes, inits, x_shape, y_shape):
    g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, x_shape)], [h.make_tensor_value_info("y", T.FLOAT, y_shape)], inits)
    return h.make_model(g, opset_imports=[h.make_opsetid("", 21)])
def bench(s, x, reps=10):
    s.run(None, {"x": x}); ts = []
    for _ in range(reps):
        t = time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter() - t)
    return np.median(ts) * 1e3
def conv3(cin, cout, S, N):
    w = (rng.standard_normal((cout, cin, 3, 3)) * 0.02).astype(np.float32); b = np.zeros(cout, np.float32)
    x = rng.standard_normal((N, cin, S, S)).astype(np.float32)
    conv = model([h.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], [nh.from_array(w, "w"), nh.from_array(b, "b")], x.shape, [N, cout, S, S])
    conv, _ = weight_only_qdq(conv, ("Conv",))
    # im2col in channels-last, then MatMul
    nodes = [h.make_node("Pad", ["x", "pads"], ["xp"])]
    cols = []
    for i in range(3):
        for j in range(3):
            nodes.append(h.make_node("Slice", ["xp", f"st{i}{j}", f"en{i}{j}", "ax"], [f"s{i}{j}"]))
            nodes.append(h.make_node("Unsqueeze", [f"s{i}{j}", "two"], [f"u{i}{j}"])); cols.append(f"u{i}{j}")
    nodes += [h.make_node("Concat", cols, ["P"], axis=2), h.make_node("Transpose", ["P"], ["Pt"], perm=[0, 3, 4, 1, 2]),
              h.make_node("Reshape", ["Pt", "s1"], ["A"]), h.make_node("MatMul", ["A", "W"], ["mm"]), h.make_node("Add", ["mm", "b"], ["yb"]),
              h.make_node("Transpose", ["yb"], ["yt"], perm=[0, 2, 1]), h.make_node("Reshape", ["yt", "s2"], ["y"])]
    inits = [nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"), nh.from_array(np.array([2], np.int64), "two"),
             nh.from_array(np.array([2, 3], np.int64), "ax"), nh.from_array(np.array([0, S * S, cin * 9], np.int64), "s1"),
             nh.from_array(np.array([0, cout, S, S], np.int64), "s2"), nh.from_array(w.reshape(cout, cin * 9).T.copy(), "W"), nh.from_array(b, "b")]
    for i in range(3):
        for j in range(3):
            inits += [nh.from_array(np.array([i, j], np.int64), f"st{i}{j}"), nh.from_array(np.array([i + S, j + S], np.int64), f"en{i}{j}")]
    mm = model(nodes, inits, x.shape, [N, cout, S, S])
    return x, conv, mm
def conv1(cin, cout, S, N):
    w = (rng.standard_normal((cout, cin, 1, 1)) * 0.05).astype(np.float32); b = np.zeros(cout, np.float32)
    x = rng.standard_normal((N, cin, S, S)).astype(np.float32)
    # as in the U-Net: conv then Transpose(0,2,3,1) + Reshape to tokens
    conv = model([h.make_node("Conv", ["x", "w", "b"], ["c"]), h.make_node("Transpose", ["c"], ["ct"], perm=[0, 2, 3, 1]), h.make_node("Reshape", ["ct", "s"], ["y"])],
                 [nh.from_array(w, "w"), nh.from_array(b, "b"), nh.from_array(np.array([0, S * S, cout], np.int64), "s")], x.shape, [N, S * S, cout])
    conv, _ = weight_only_qdq(conv, ("Conv",))
    mm = model([h.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]), h.make_node("Reshape", ["xt", "s"], ["A"]), h.make_node("MatMul", ["A", "W"], ["mm"]), h.make_node("Add", ["mm", "b"], ["y"])],
               [nh.from_array(w.reshape(cout, cin).T.copy(), "W"), nh.from_array(b, "b"), nh.from_array(np.array([0, S * S, cin], np.int64), "s")], x.shape, [N, S * S, cout])
    return x, conv, mm
for label, (x, conv, mm) in [("3x3 1280->1280 @8x8 b3", conv3(1280, 1280, 8, 3)), ("3x3 2560->1280 @8x8 b3", conv3(2560, 1280, 8, 3)),
                             ("1x1 320->320 @64x64 b3", conv1(320, 320, 64, 3)), ("1x1 1280->1280 @16x16 b3", conv1(1280, 1280, 16, 3)),
                             ("1x1 640->640 @32x32 b3", conv1(640, 640, 32, 3))]:
    nb, _ = matmul_nbits8(mm)
    s_conv, s0 = sess(conv), sess(nb)
    nb4, _ = int8_matmul_compute(onnx.ModelProto.FromString(nb.SerializeToString()), keep_float=())
    s4 = sess(nb4)
    ref = s_conv.run(None, {"x": x})[0]; r0 = s0.run(None, {"x": x})[0]; r4 = s4.run(None, {"x": x})[0]
    err = lambda a: float(np.linalg.norm(a - ref) / np.linalg.norm(ref))
    res = []
    for rnd in range(3):
        res.append((bench(s_conv, x), bench(s0, x), bench(s4, x)))
    c, a0, a4 = np.median(np.array(res), 0)
    print(f"{label:28s} conv {c:7.1f} ms | matmulnbits acc0 {a0:7.1f} ms ({a0/c:.2f}x, rel {err(r0):.1e}) | acc4 {a4:7.1f} ms ({a4/c:.2f}x, rel {err(r4):.1e})", flush=True)
