"""Per-convolution time inside a U-Net forward: direct (DequantizeLinear + Conv) vs Winograd.

    python -m benchmarks.experiments.winograd_profile DIRECT_BUNDLE WINOGRAD_BUNDLE [--runs 3]

Both bundles are int8-cpu exports of the same model, one from before the Winograd rewrite (or
with it undone): ORT's profiler times every node over ``--runs`` warm forwards at batch 1 with
the bundle's session config, the two bundles in turns, and each rewritten convolution's nodes (named after the original
Conv) are summed; a direct convolution's time includes its weight's DequantizeLinear node. Prints
ms per forward by spatial size and channels, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import onnx
import onnxruntime as ort

from benchmarks.common import header, profiling_options, unet_feed
from zoodip_edge.bundle import load_bundle
from zoodip_edge.export.winograd import spatial_sizes


def node_ms(bundles: list[str], runs: int) -> list[Counter]:
    """ms per forward of each node, per bundle; a Winograd node counts for the Conv it replaced.

    The bundles' sessions run in turns (one forward each, ``runs`` rounds), so drift on a shared
    machine reaches both alike.
    """
    sessions, feeds = [], []
    with tempfile.TemporaryDirectory() as d:
        for i, bundle in enumerate(bundles):
            b = load_bundle(bundle, verify=False)
            o = profiling_options(b.manifest, str(Path(d) / f"profile{i}"))
            sessions.append(ort.InferenceSession(str(b.path("unet")), o, providers=["CPUExecutionProvider"]))
            feeds.append(unet_feed(b.manifest))
        for _ in range(runs + 1):  # the first (warm-up) round is in the profiles too; it is left out below
            for s, feed in zip(sessions, feeds):
                s.run(None, feed)
        out = []
        for s in sessions:
            events = [e for e in json.load(open(s.end_profiling())) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            first_run = len(events) // (runs + 1)
            ms: Counter = Counter()
            for e in events[first_run:]:
                ms[e["name"][: -len("_kernel_time")].split(".winograd")[0]] += e["dur"] / runs / 1e3
            out.append(ms)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("direct")
    ap.add_argument("winograd")
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    print(header(sys.argv))
    direct, wino = node_ms([a.direct, a.winograd], a.runs)
    b = load_bundle(a.direct, verify=False)
    model = onnx.load(str(b.path("unet")), load_external_data=False)
    hw = spatial_sizes(model)
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    rows: dict = defaultdict(lambda: [0.0, 0.0, 0])
    for n in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type != "Conv" or attrs.get("kernel_shape") != [3, 3] or attrs.get("strides", [1, 1]) != [1, 1]:
            continue
        dq = producer.get(n.input[1])
        dims = inits[dq.input[0]].dims if dq is not None and dq.input[0] in inits else [0, 0]
        key = f"{hw[n.input[0]][0]}² {dims[1]}→{dims[0]}"
        # a direct convolution's weight DequantizeLinear is a node of its own (in both bundles where
        # the convolution was left alone); a rewritten one's is among its Winograd nodes
        dq_name = dq.name if dq is not None else ""
        rows[key][0] += direct.get(n.name, 0.0) + direct.get(dq_name, 0.0)
        rows[key][1] += wino.get(n.name, 0.0) + wino.get(dq_name, 0.0)
        rows[key][2] += 1
    print("| 3×3 conv (spatial, in→out ch) | count | direct ms | Winograd graph ms | direct / Winograd |")
    print("|---|---|---|---|---|")
    for key, (d, w, c) in sorted(rows.items(), key=lambda kv: -kv[1][0]):
        print(f"| {key} | {c} | {d:.1f} | {w:.1f} | {d / w if w else float('nan'):.2f}× |")
    td, tw = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    print(f"| all 3×3 stride-1 | {sum(r[2] for r in rows.values())} | {td:.0f} | {tw:.0f} | {td / tw:.2f}× |")
    print(f"\nwhole forward (sum of node times): direct {sum(direct.values()) / 1e3:.2f} s, Winograd {sum(wino.values()) / 1e3:.2f} s")


if __name__ == "__main__":
    main()
