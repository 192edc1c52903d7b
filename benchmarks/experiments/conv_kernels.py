"""One SD1.5-sized 3x3 convolution on ORT's CPU EP, in each form an export could give it.

    python -m benchmarks.experiments.conv_kernels [--shapes 320x64,640x32,1280x16] [--repeat 5]

Prints ms, GMAC/s and the relative error against fp32 for: fp32 Conv (constant weights),
DequantizeLinear + Conv (what int8-cpu runs), ConvInteger (what ORT's dynamic quantization
emits; s8 and u8 weights), and QLinearConv with a fixed input grid (what w8a8-static emits).
Tells whether a conv can get faster without int8 compute: fp32 already runs near the FMA peak.
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
ap.add_argument("--shapes", default="320x64,640x32,1280x16", help="channels x spatial size, comma separated")
ap.add_argument("--repeat", type=int, default=5)
a = ap.parse_args()


def forms(c: int, hw: int, rng: np.random.Generator) -> tuple[dict[str, bytes], np.ndarray]:
    w = (rng.standard_normal((c, c, 3, 3)) * 0.02).astype(np.float32)
    ws = (np.abs(w).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / ws.reshape(-1, 1, 1, 1)), -127, 127).astype(np.int8)
    wu = (wq.astype(np.int16) + 128).astype(np.uint8)
    x = rng.standard_normal((1, c, hw, hw)).astype(np.float32)
    pads = {"pads": [1, 1, 1, 1]}

    def model(nodes, inits):
        g = h.make_graph(nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, c, hw, hw])],
                         [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
        return h.make_model(g, opset_imports=[h.make_opsetid("", 21)]).SerializeToString()

    x_grid = [nh.from_array(np.float32(8 / 255), "xs"), nh.from_array(np.uint8(128), "xz")]
    w_int8 = [nh.from_array(wq, "wq"), nh.from_array(ws, "ws"), nh.from_array(np.zeros(c, np.int8), "wz")]

    def conv_integer(weights, zero):
        return model([h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                      h.make_node("ConvInteger", ["xq", "wx", "xz", "wzs"], ["yi"], **pads),
                      h.make_node("Cast", ["yi"], ["yf"], to=T.FLOAT), h.make_node("Mul", ["xs", "wsr"], ["s"]),
                      h.make_node("Mul", ["yf", "s"], ["y"])],
                     [*x_grid, nh.from_array(weights, "wx"), nh.from_array(zero, "wzs"), nh.from_array(ws.reshape(1, c, 1, 1), "wsr")])

    return {
        "fp32 Conv": model([h.make_node("Conv", ["x", "w"], ["y"], **pads)], [nh.from_array(w, "w")]),
        "DequantizeLinear + Conv (int8-cpu)": model([h.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=0),
                                                     h.make_node("Conv", ["x", "wd"], ["y"], **pads)], w_int8),
        "ConvInteger, s8 weights": conv_integer(wq, np.int8(0)),
        "ConvInteger, u8 weights": conv_integer(wu, np.uint8(128)),
        "QLinearConv, fixed grids (w8a8-static)": model(
            [h.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             h.make_node("QLinearConv", ["xq", "xs", "xz", "wq", "ws", "wz", "ys", "yz"], ["yq"], **pads),
             h.make_node("DequantizeLinear", ["yq", "ys", "yz"], ["y"])],
            [*x_grid, *w_int8, nh.from_array(np.float32(0.05), "ys"), nh.from_array(np.uint8(128), "yz")]),
    }, x


rows = ["| conv | form | ms | GMAC/s | rel. error vs fp32 |", "|---|---|---|---|---|"]
rng = np.random.default_rng(0)
for shape in a.shapes.split(","):
    c, hw = (int(v) for v in shape.split("x"))
    gmac = c * c * 9 * hw * hw / 1e9
    models, x = forms(c, hw, rng)
    ref = None
    for name, blob in models.items():
        sess = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
        y = sess.run(None, {"x": x})[0]
        ref = y if ref is None else ref
        t = time.perf_counter()
        for _ in range(a.repeat):
            sess.run(None, {"x": x})
        ms = (time.perf_counter() - t) / a.repeat * 1e3
        err = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        rows.append(f"| {c}→{c} 3×3 at {hw}×{hw} ({gmac:.2f} GMAC) | {name} | {ms:.1f} | {gmac / ms * 1e3:.0f} | {err:.4f} |")
        print(rows[-1], flush=True)
print(header(sys.argv) + "\n" + "\n".join(rows))
