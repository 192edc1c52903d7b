"""SD1.5-sized convolutions as im2col + MatMulNBits (int8 compute, block-wise dynamic activations) on ORT's CPU EP.

    python -m benchmarks.experiments.conv_blockwise_int8 [--shapes 320x64,640x32,1280x16] [--batches 1,3] [--repeat 7]
                                             [--radii 1e-4,1e-3] [--directions 8] [--threads 2]

A shape is ``CxS`` (C→C 3×3, pad 1, at S×S) or ``CxSk1`` (C→C 1×1). Every form has a bias. Forms:
  (a) fp32 Conv; (b) DequantizeLinear(int8 per-channel weight) + Conv (what int8-cpu runs);
  (c) im2col in standard ONNX ops + MatMulNBits(bits 8, block 32, accuracy_level 4: int8 compute with
      activations quantized per block of 32 along K) + bias, back to NCHW; two im2col layouts:
      "nhwc": Transpose x to NHWC, Pad, 9 Slices concatenated on the channel axis -> [N, H·W, 9·C]
      (K ordered (kh, kw, c_in)), "nchw": Pad, 9 Slices concatenated on axis 1 -> [N, 9·C, H·W], Transpose;
  (d) as (c) with accuracy_level 0 (float compute);
  (e) QLinearConv with fixed per-tensor uint8 grids calibrated from x's and y's range (the known-bad reference).
Prints ms (median after warm-up), GMAC/s, relative error of the output against fp32, and a finite-difference
fidelity figure (batch 1 only): L(x) = sum(w_out * conv(x)) with fixed random w_out; for random directions
δ_i with ‖δ_i‖/‖x‖ = r, D_i = (L(x+δ_i) − L(x−δ_i)) / 2; pearson of the form's D against fp32's and
‖D − D_fp32‖ / ‖D_fp32‖.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

from benchmarks.common import header

ap = argparse.ArgumentParser()
ap.add_argument("--shapes", default="320x64,640x32,1280x16", help="CxS (3×3) or CxSk1 (1×1), comma separated")
ap.add_argument("--batches", default="1,3")
ap.add_argument("--repeat", type=int, default=7)
ap.add_argument("--warmup", type=int, default=2)
ap.add_argument("--radii", default="1e-4,1e-3", help="‖δ‖/‖x‖ of the finite-difference probes")
ap.add_argument("--directions", type=int, default=8)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--layouts", default="nhwc,nchw", help="im2col layouts to try for (c) and (d)")
ap.add_argument("--breakdown", action="store_true",
                help="instead: time the im2col part alone and the GEMM alone (MatMul fp32, MatMulNBits acc0/acc4) "
                     "on a ready [N, H·W, K] matrix, and check that acc4 gives bit-identical outputs run to run")
a = ap.parse_args()

OPSETS = [h.make_opsetid("", 21), h.make_opsetid("com.microsoft", 1)]


def nbits8(wmat: np.ndarray, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float weight -> MatMulNBits (bits 8, symmetric, block-wise) B and scales, via ORT's own quantizer."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    k, n = wmat.shape
    g = h.make_graph([h.make_node("MatMul", ["a", "w"], ["y"])], "g", [h.make_tensor_value_info("a", T.FLOAT, [1, k])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], [nh.from_array(wmat, "w")])
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=0, bits=8,
                                       op_types_to_quantize=("MatMul",))
    q = MatMulNBitsQuantizer(h.make_model(g, opset_imports=OPSETS), bits=8, block_size=block, is_symmetric=True,
                             accuracy_level=0, algo_config=cfg)
    q.process()
    node = next(n for n in q.model.model.graph.node if n.op_type == "MatMulNBits")
    inits = {i.name: nh.to_array(i) for i in q.model.model.graph.initializer}
    return inits[node.input[1]], inits[node.input[2]]


def im2col_nodes(x: str, c: int, hw: int, k: int, layout: str, prefix: str = "") -> tuple[list, list, str]:
    """Nodes from NCHW ``x`` to a [N, H·W, K] matrix whose K order is (kh, kw, c_in); returns (nodes, inits, name)."""
    p = prefix
    nodes, inits = [], []
    if k == 1 or layout == "nhwc":
        inits.append(nh.from_array(np.array([0, -1, c * k * k], np.int64), p + "shape_a"))
    if k == 1:
        nodes.append(h.make_node("Transpose", [x], [p + "xt"], perm=[0, 2, 3, 1]))
        nodes.append(h.make_node("Reshape", [p + "xt", p + "shape_a"], [p + "A"]))
        return nodes, inits, p + "A"
    if layout == "nhwc":
        nodes.append(h.make_node("Transpose", [x], [p + "xt"], perm=[0, 2, 3, 1]))
        inits.append(nh.from_array(np.array([0, 1, 1, 0, 0, 1, 1, 0], np.int64), p + "pads"))
        nodes.append(h.make_node("Pad", [p + "xt", p + "pads"], [p + "xp"]))
        axes = np.array([1, 2], np.int64)
    else:
        inits.append(nh.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), p + "pads"))
        nodes.append(h.make_node("Pad", [x, p + "pads"], [p + "xp"]))
        axes = np.array([2, 3], np.int64)
    inits.append(nh.from_array(axes, p + "axes"))
    cols = []
    for kh in range(3):
        for kw in range(3):
            inits.append(nh.from_array(np.array([kh, kw], np.int64), f"{p}st{kh}{kw}"))
            inits.append(nh.from_array(np.array([kh + hw, kw + hw], np.int64), f"{p}en{kh}{kw}"))
            nodes.append(h.make_node("Slice", [p + "xp", f"{p}st{kh}{kw}", f"{p}en{kh}{kw}", p + "axes"], [f"{p}s{kh}{kw}"]))
            cols.append(f"{p}s{kh}{kw}")
    if layout == "nhwc":
        nodes.append(h.make_node("Concat", cols, [p + "cols"], axis=3))  # [N, H, W, 9C]
        nodes.append(h.make_node("Reshape", [p + "cols", p + "shape_a"], [p + "A"]))
    else:
        nodes.append(h.make_node("Concat", cols, [p + "cols"], axis=1))  # [N, 9C, H, W]
        inits.append(nh.from_array(np.array([0, c * 9, -1], np.int64), p + "shape_c"))
        nodes.append(h.make_node("Reshape", [p + "cols", p + "shape_c"], [p + "cr"]))
        nodes.append(h.make_node("Transpose", [p + "cr"], [p + "A"], perm=[0, 2, 1]))
    return nodes, inits, p + "A"


def forms(c: int, hw: int, k: int, n: int, rng: np.random.Generator, layouts: list[str]) -> tuple[dict[str, bytes], np.ndarray]:
    w = (rng.standard_normal((c, c, k, k)) * (1 / np.sqrt(c * k * k))).astype(np.float32)
    b = (rng.standard_normal(c) * 0.1).astype(np.float32)
    ws = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / ws.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
    pads = {"pads": [k // 2] * 4}

    def model(nodes, inits):
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [n, c, hw, hw])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
        return h.make_model(g, opset_imports=OPSETS).SerializeToString()

    # K order (kh, kw, c_in): W[co, ci, kh, kw] -> [co, kh, kw, ci] -> [co, K] -> B is [K, co]
    bq, bs = nbits8(np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(c, -1).T))

    def mmnb(layout: str, acc: int) -> bytes:
        nodes, inits, amat = im2col_nodes("x", c, hw, k, layout)
        nodes += [h.make_node("MatMulNBits", [amat, "bq", "bs", "", "", "b"], ["ym"], domain="com.microsoft",
                              K=c * k * k, N=c, bits=8, block_size=32, accuracy_level=acc),  # [N, H·W, C_out]
                  h.make_node("Transpose", ["ym"], ["yt"], perm=[0, 2, 1]),
                  h.make_node("Reshape", ["yt", "shape_y"], ["y"])]
        inits += [nh.from_array(bq, "bq"), nh.from_array(bs, "bs"), nh.from_array(b, "b"),
                  nh.from_array(np.array([0, c, hw, hw], np.int64), "shape_y")]
        return model(nodes, inits)

    out = {
        "(a) fp32 Conv": model([h.make_node("Conv", ["x", "w", "b"], ["y"], **pads)], [nh.from_array(w, "w"), nh.from_array(b, "b")]),
        "(b) DequantizeLinear + Conv (int8-cpu)": model(
            [h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0), h.make_node("Conv", ["x", "wd", "b"], ["y"], **pads)],
            [nh.from_array(wq, "wq"), nh.from_array(ws, "ws"), nh.from_array(np.zeros(c, np.int8), "wz"), nh.from_array(b, "b")]),
    }
    for lay in layouts if k == 3 else ["nhwc"]:
        out[f"(c) im2col[{lay}] + MatMulNBits acc4"] = mmnb(lay, 4)
    for lay in layouts if k == 3 else ["nhwc"]:
        out[f"(d) im2col[{lay}] + MatMulNBits acc0"] = mmnb(lay, 0)

    # (e) fixed per-tensor grids: x's from x's range, y's from the fp32 output's range
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    xs = np.float32((hi - lo) / 255)
    xz = np.uint8(np.clip(np.rint(-lo / xs), 0, 255))
    yref = ort.InferenceSession(out["(a) fp32 Conv"], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    ylo, yhi = min(float(yref.min()), 0.0), max(float(yref.max()), 0.0)
    ys = np.float32((yhi - ylo) / 255)
    yz = np.uint8(np.clip(np.rint(-ylo / ys), 0, 255))
    bi = np.rint(b / (xs * ws)).astype(np.int32)
    out["(e) QLinearConv, fixed per-tensor grids"] = model(
        [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
         h.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz", "bi"], ["yq"], **pads),
         h.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])],
        [nh.from_array(xs, "xs"), nh.from_array(xz, "xz"), nh.from_array(wq, "wq"), nh.from_array(ws, "ws"),
         nh.from_array(np.zeros(c, np.int8), "wz"), nh.from_array(ys, "ys"), nh.from_array(yz, "yz"), nh.from_array(bi, "bi")])
    return out, x


def session(blob: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    return ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])


def fd(sess: ort.InferenceSession, x: np.ndarray, w_out: np.ndarray, deltas: list[np.ndarray]) -> np.ndarray:
    def loss(v):
        return float(np.dot(w_out.ravel(), sess.run(None, {"x": v})[0].astype(np.float64).ravel()))
    return np.array([(loss(x + d) - loss(x - d)) / 2 for d in deltas])


def timed(sess: ort.InferenceSession, feed: dict) -> float:
    for _ in range(a.warmup):
        sess.run(None, feed)
    ts = []
    for _ in range(a.repeat):
        t = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def breakdown() -> None:
    rows = ["| conv | batch | part | ms | GMAC/s | deterministic |", "|---|---|---|---|---|---|"]
    for shape in a.shapes.split(","):
        k = 1 if shape.endswith("k1") else 3
        c, hw = (int(v) for v in shape.removesuffix("k1").split("x"))
        kk = c * k * k
        for n in (int(v) for v in a.batches.split(",")):
            rng = np.random.default_rng(0)
            gmac = n * c * kk * hw * hw / 1e9
            wmat = (rng.standard_normal((kk, c)) / np.sqrt(kk)).astype(np.float32)
            bq, bs = nbits8(wmat)
            x = rng.standard_normal((n, c, hw, hw)).astype(np.float32)
            amat = rng.standard_normal((n, hw * hw, kk)).astype(np.float32)
            parts = {}
            for lay in a.layouts.split(",") if k == 3 else ["nhwc"]:
                nodes, inits, out = im2col_nodes("x", c, hw, k, lay)
                nodes.append(h.make_node("Identity", [out], ["y"]))
                g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [n, c, hw, hw])],
                                 [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
                parts[f"im2col[{lay}] only"] = (h.make_model(g, opset_imports=OPSETS).SerializeToString(), {"x": x})

            def gemm(node, inits):
                g = h.make_graph([node], "g", [h.make_tensor_value_info("a", T.FLOAT, [n, hw * hw, kk])],
                                 [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
                return h.make_model(g, opset_imports=OPSETS).SerializeToString(), {"a": amat}
            parts["MatMul fp32 alone"] = gemm(h.make_node("MatMul", ["a", "w"], ["y"]), [nh.from_array(wmat, "w")])
            for acc in (0, 4):
                parts[f"MatMulNBits acc{acc} alone"] = gemm(
                    h.make_node("MatMulNBits", ["a", "bq", "bs"], ["y"], domain="com.microsoft", K=kk, N=c, bits=8,
                                block_size=32, accuracy_level=acc), [nh.from_array(bq, "bq"), nh.from_array(bs, "bs")])
            for name, (blob, feed) in parts.items():
                sess = session(blob)
                y0 = sess.run(None, feed)[0]
                ms = timed(sess, feed)
                same = all(np.array_equal(y0, sess.run(None, feed)[0]) for _ in range(3))
                g = f"{gmac / ms * 1e3:.0f}" if "MatMul" in name else "–"
                rows.append(f"| {c}→{c} {k}×{k} at {hw}×{hw} | {n} | {name} | {ms:.1f} | {g} | {same} |")
                print(rows[-1], flush=True)
    print(header(sys.argv) + "\n" + "\n".join(rows))


if a.breakdown:
    breakdown()
    sys.exit(0)

radii = [float(r) for r in a.radii.split(",")]
fd_cols = "".join(f" FD pearson r={r:g} | FD rel. err r={r:g} |" for r in radii)
rows = [f"| conv | batch | form | ms | GMAC/s | rel. error vs fp32 |{fd_cols}", "|---|---|---|---|---|---|" + "---|---|" * len(radii)]
layouts = a.layouts.split(",")
for shape in a.shapes.split(","):
    k = 1 if shape.endswith("k1") else 3
    c, hw = (int(v) for v in shape.removesuffix("k1").split("x"))
    for n in (int(v) for v in a.batches.split(",")):
        rng = np.random.default_rng(0)
        gmac = n * c * c * k * k * hw * hw / 1e9
        models, x = forms(c, hw, k, n, rng, layouts)
        w_out = rng.standard_normal((n, c, hw, hw))
        deltas = {}
        for r in radii:
            ds = []
            for _ in range(a.directions):
                d = rng.standard_normal(x.shape)
                ds.append((d * (r * np.linalg.norm(x) / np.linalg.norm(d))).astype(np.float32))
            deltas[r] = ds
        ref = ref_d = None
        for name, blob in models.items():
            sess = session(blob)
            y = sess.run(None, {"x": x})[0]
            ref = y if ref is None else ref
            for _ in range(a.warmup):
                sess.run(None, {"x": x})
            ts = []
            for _ in range(a.repeat):
                t = time.perf_counter()
                sess.run(None, {"x": x})
                ts.append(time.perf_counter() - t)
            ms = float(np.median(ts)) * 1e3
            err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
            fdtxt = ""
            if n == 1:
                ds = {r: fd(sess, x, w_out, deltas[r]) for r in radii}
                ref_d = ds if ref_d is None else ref_d
                for r in radii:
                    p = np.corrcoef(ds[r], ref_d[r])[0, 1]
                    e = np.linalg.norm(ds[r] - ref_d[r]) / np.linalg.norm(ref_d[r])
                    fdtxt += f" {p:.4f} | {e:.4f} |"
            else:
                fdtxt = " – | – |" * len(radii)
            rows.append(f"| {c}→{c} {k}×{k} at {hw}×{hw} | {n} | {name} | {ms:.1f} | {gmac / ms * 1e3:.0f} | {err:.4f} |{fdtxt}")
            print(rows[-1], flush=True)
            del sess
print(header(sys.argv) + "\n" + "\n".join(rows))
