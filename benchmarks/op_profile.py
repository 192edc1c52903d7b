"""Where a U-Net forward's time goes: ORT's profiler, summed by kind of work, with the multiply-adds.

    python -m benchmarks.op_profile BUNDLE [BUNDLE ...] [--batch 3] [--one-sample] [--runs 2] [--top 15]

Each bundle's U-Net runs ``--runs`` profiled forwards after one warm-up (the bundles in turns,
so drift reaches them alike), with the bundle's session config. Node times are summed into the
kinds this project's rewrites make (MatMulNBits by compute type, attention, the Winograd
convolutions' parts, direct convolutions) and every other op type. Prints a markdown table of
ms per forward, the slowest nodes, and the sum of node times beside the wall time: node times
leave out the executor's own work and any wait between nodes.

Multiply-adds come from the shapes ORT's profiler records for each node (MatMul, MatMulNBits,
Gemm, Conv, attention). Beside them: the rate each kind ran at, and a plain float ``MatMul``
(4096x1024 by 1024x1024) timed in the same process, this machine's float GEMM rate to compare
with. "Direct-convolution equivalent" counts each Winograd product as the 3x3 convolution it
stands for (x4 for F(4x4), x2.25 for F(2x2)): what a graph without the rewrite would multiply.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort

from benchmarks.common import header, median_s, profiling_options, unet_feed
from zoodip_edge.bundle import load_bundle

# suffixes of the node names export/winograd.py gives each Winograd convolution's parts
WINOGRAD_PARTS = {
    "x1": "input transform", "v": "input transform", "v4": "input transform", "V": "input transform",
    "x": "input transform",
    "dq": "weight transform", "w9": "weight transform", "u": "weight transform", "U": "weight transform",
    "M": "products",
    "m3": "output transform", "y3": "output transform", "y4": "output transform", "d2s": "output transform",
    "sum": "output transform", "bias": "output transform",
}


CONV_OPS = ("Conv", "FusedConv", "NchwcConv")  # a Conv as ORT's fusions and NCHWc layout pass rename it


def kind(name: str, op: str, accuracy: dict[str, int]) -> str:
    """The kind of work of one profiled node (its name in the graph, its kernel's op type)."""
    if ".winograd" in name:
        part = WINOGRAD_PARTS.get(name.rsplit(".", 1)[-1])
        if part is None and op in CONV_OPS:
            part = "input transform"  # the transform's Conv, renamed by ORT's NCHWc layout pass
        return "Winograd " + (part or "other")
    if op == "MatMulNBits":
        return "MatMulNBits, int8 compute" if accuracy.get(name, 0) == 4 else "MatMulNBits, float compute"
    if op in ("MultiHeadAttention", "Attention"):
        return "attention"
    if op in CONV_OPS:
        return "Conv (direct)"
    return op


def macs(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> float:
    """Multiply-adds of one node from its profiled input and output shapes (0 for other ops)."""
    if not inputs or not outputs or not outputs[0]:
        return 0.0
    out = math.prod(outputs[0])
    if op in ("MatMul", "MatMulNBits", "FusedMatMul"):
        return float(out * inputs[0][-1])  # every output element is a dot product along A's last axis
    if op == "Gemm":
        return float(out * math.prod(inputs[0]) // outputs[0][0])
    if op in CONV_OPS:
        return float(out * math.prod(inputs[1]) // outputs[0][1])  # per output: Cin/groups x kernel taps
    if op in ("MultiHeadAttention", "Attention") and len(inputs) >= 3:
        return float(2 * math.prod(inputs[0]) * inputs[1][1])  # Q K^T and P V: B x S x S_kv x hidden each
    return 0.0


def winograd_direct_factor(name: str, inputs: list[list[int]]) -> float:
    """How many direct-convolution multiply-adds one multiply-add of a Winograd product stands for."""
    if ".winograd" not in name or not name.endswith(".M") or not inputs:
        return 1.0
    taps = inputs[0][0]  # the transformed weights [(m+2)^2, Cout, Cin]
    m = math.isqrt(taps) - 2
    return 9 * m * m / taps


def gemm_rate(repeat: int = 11) -> float:
    """GMAC/s of a plain float MatMul (4096x1024 @ 1024x1024) in ORT with default threads."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    a = rng.standard_normal((4096, 1024), dtype=np.float32)
    b = numpy_helper.from_array(rng.standard_normal((1024, 1024), dtype=np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [4096, 1024])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, None)], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return 4096 * 1024 * 1024 / median_s(lambda: s.run(None, {"A": a}), repeat) / 1e9


def profile(bundles: list[str], batch: int, one_sample: bool,
            runs: int) -> list[tuple[Counter, Counter, float, Counter, Counter]]:
    """Per bundle: ms per forward by kind, by node, the median wall time of a forward (ms), and
    multiply-adds per forward by kind, as run and as a direct-convolution graph would run them."""
    sessions, feeds, walls, graphs = [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        for i, bundle in enumerate(bundles):
            b = load_bundle(bundle, verify=False)
            graphs.append(b.path("unet"))
            o = profiling_options(b.manifest, str(Path(d) / f"profile{i}"))
            sessions.append(ort.InferenceSession(str(b.path("unet")), o, providers=["CPUExecutionProvider"]))
            feeds.append(unet_feed(b.manifest, batch, one_sample=one_sample))
            walls.append([])
        for r in range(runs + 1):  # round 0 warms up; it is in the profile and left out below
            for s, feed, w in zip(sessions, feeds, walls):
                t = time.perf_counter()
                s.run(None, feed)
                if r:
                    w.append((time.perf_counter() - t) * 1e3)
        out = []
        for graph, s, w in zip(graphs, sessions, walls):
            model = onnx.load(str(graph), load_external_data=False)
            accuracy = {n.name: a.i for n in model.graph.node if n.op_type == "MatMulNBits"
                        for a in n.attribute if a.name == "accuracy_level"}
            events = [e for e in json.load(open(s.end_profiling())) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            first = len(events) // (runs + 1)
            by_kind, by_node, mac, direct = Counter(), Counter(), Counter(), Counter()
            for e in events[first:]:
                name, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "")
                ms = e["dur"] / runs / 1e3
                k = kind(name, op, accuracy)
                by_kind[k] += ms
                by_node[name] += ms
                shapes = [[next(iter(t.values())) for t in e["args"].get(f"{io}_type_shape", [])] for io in ("input", "output")]
                n = macs(op, *shapes) / runs
                mac[k] += n
                direct[k] += n * winograd_direct_factor(name, shapes[0])
            out.append((by_kind, by_node, sorted(w)[len(w) // 2], mac, direct))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--one-sample", action="store_true", help="sample/timestep with batch 1 (a U-Net with a shared prefix)")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--top", type=int, default=15, help="slowest nodes listed per bundle")
    a = ap.parse_args()
    if a.runs < 1 or a.batch < 1:
        ap.error("--runs and --batch must be at least 1")
    print(header(sys.argv))
    rate_before = gemm_rate()
    results = profile(a.bundles, a.batch, a.one_sample, a.runs)
    rate_after = gemm_rate()
    rate = (rate_before + rate_after) / 2
    kinds = sorted({k for r in results for k in r[0]}, key=lambda k: -results[0][0].get(k, 0.0))
    print(f"Per forward, batch {a.batch}{' (one sample)' if a.one_sample else ''}, {a.runs} profiled runs after one warm-up. "
          f"A plain float MatMul ran at {rate_before:.1f} GMAC/s before and {rate_after:.1f} after.\n")
    print("| kind | " + " | ".join(f"{Path(b).name}: ms | GMAC | GMAC/s" for b in a.bundles) + " |")
    print("|---|" + "---|---|---|" * len(a.bundles))

    def cells(ms: float, gmac: float) -> str:
        return f"{ms:,.0f} | {gmac:,.1f} | {gmac / ms * 1e3:.1f}" if gmac else f"{ms:,.0f} | | "

    for k in kinds:
        print(f"| {k} | " + " | ".join(cells(r[0].get(k, 0.0), r[3].get(k, 0.0) / 1e9) for r in results) + " |")
    print("| sum of node times | " + " | ".join(cells(sum(r[0].values()), sum(r[3].values()) / 1e9) for r in results) + " |")
    print("| wall time (median) | " + " | ".join(f"{r[2]:,.0f} | | " for r in results) + " |")
    print("| direct-convolution equivalent | " + " | ".join(f" | {sum(r[4].values()) / 1e9:,.1f} | " for r in results) + " |")
    print(f"\nAt the plain MatMul's rate ({rate:.1f} GMAC/s, mean of before and after), the multiply-adds alone take:")
    for bundle, r in zip(a.bundles, results):
        print(f"- {Path(bundle).name}: {sum(r[3].values()) / rate / 1e6:,.0f} ms as run, "
              f"{sum(r[4].values()) / rate / 1e6:,.0f} ms for a direct-convolution graph")
    for bundle, (_, by_node, *_) in zip(a.bundles, results):
        print(f"\nslowest nodes, {bundle}:\n")
        for name, ms in by_node.most_common(a.top):
            print(f"- {ms:,.1f} ms  {name}")


if __name__ == "__main__":
    main()
