"""Does ORT's CPU kernel for the ONNX Attention op (opset 23) hold the full score matrix?

    python -m benchmarks.experiments.attention_memory [--length 4096] [--heads 8] [--dim 40]

One graph per variant (the Attention op; MatMul-Softmax-MatMul; com.microsoft's
MultiHeadAttention, whose CPU kernel has a flash-attention path), each in its own process:
peak RSS over the process after loading, against the size of one fp32 score matrix. The
defaults are SD1.5's largest self-attention at 512 px (64 x 64 latents, 8 heads of 40).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.common import header, run_measured

CHILD = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
kind, L, H, D = sys.argv[1], *map(int, sys.argv[2:5])
vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, H, L, D])
if kind == "Attention":
    nodes, opset = [helper.make_node("Attention", ["q", "k", "v"], ["o"])], 23
elif kind == "MultiHeadAttention":
    # com.microsoft's op takes (batch, length, heads * dim); the reshapes are what an export adds.
    nodes = [helper.make_node("Transpose", [n], [n + "t"], perm=[0, 2, 1, 3]) for n in "qkv"]
    nodes += [helper.make_node("Reshape", [n + "t", "shape"], [n + "3"]) for n in "qkv"]
    nodes += [helper.make_node("MultiHeadAttention", ["q3", "k3", "v3"], ["o3"], domain="com.microsoft", num_heads=H),
              helper.make_node("Reshape", ["o3", "shape4"], ["o4"]), helper.make_node("Transpose", ["o4"], ["o"], perm=[0, 2, 1, 3])]
    opset = 17
else:
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]), helper.make_node("MatMul", ["q", "kt"], ["s"]),
             helper.make_node("Softmax", ["s"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "v"], ["o"])]
    opset = 17
inits = [helper.make_tensor("shape", TensorProto.INT64, [3], [1, L, H * D]),
         helper.make_tensor("shape4", TensorProto.INT64, [4], [1, L, H, D])]
model = helper.make_model(helper.make_graph(nodes, "g", [vi("q"), vi("k"), vi("v")], [vi("o")], initializer=inits),
                          opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])
s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
feed = {n: np.random.default_rng(0).standard_normal((1, H, L, D), dtype=np.float32) for n in "qkv"}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t = time.perf_counter(); s.run(None, feed); s.run(None, feed)
print(json.dumps({"before_mb": before, "s": (time.perf_counter() - t) / 2}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=40)
    a = ap.parse_args()
    scores = a.heads * a.length ** 2 * 4 / 2**20
    print(header(sys.argv))
    print(f"One fp32 score matrix: {a.heads} x {a.length}^2 = {scores:.0f} MB\n")
    print("| graph | peak RSS MB | of which after loading inputs MB | growth during run MB | s/run |")
    print("|---|---|---|---|---|")
    for kind in ("Attention", "MatMul-Softmax-MatMul", "MultiHeadAttention"):
        r = run_measured([sys.executable, "-c", CHILD, kind, str(a.length), str(a.heads), str(a.dim)])
        res = r["result"]
        print(f"| {kind} | {r['peak_rss_mb']:.0f} | {res['before_mb']:.0f} | {r['peak_rss_mb'] - res['before_mb']:.0f} | {res['s']:.2f} |")


if __name__ == "__main__":
    main()
