"""Which tensors are alive together during one U-Net forward, from ORT's own execution order.

    python -m benchmarks.experiments.live_tensors BUNDLE [--batch 3] [--one-sample] [--top 12]

Runs one forward with ORT's profiler (the ``cpu`` profile's buffer settings: no memory pattern,
no buffer reuse) and saves the optimized graph beside it; the optimized graph's node order is the
order ORT ran the nodes (checked: same op at every position). Then it replays the forward: each
node's outputs are allocated (sizes from the profile), each tensor is freed after its last
reader. It prints the largest sums of live tensors and what is alive at the highest one. Kernel
scratch and allocator slack are not in it: the process's peak RSS is above these sums (the arena
rounds and fragments), but it moves with them (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile

import numpy as np
import onnx
import onnxruntime as ort

from benchmarks.common import profiling_options, unet_feed
from zoodip_edge.bundle import load_bundle

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--batch", type=int, default=3)
ap.add_argument("--one-sample", action="store_true", help="sample/timestep with batch 1 (a U-Net with a shared prefix)")
ap.add_argument("--top", type=int, default=12)
a = ap.parse_args()
b = load_bundle(a.bundle, verify=False)
m = b.manifest
with tempfile.TemporaryDirectory() as d:
    so = profiling_options(m, f"{d}/profile")
    so.enable_mem_reuse = False
    so.optimized_model_filepath = f"{d}/optimized.onnx"
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    sess = ort.InferenceSession(str(b.path("unet")), so, providers=["CPUExecutionProvider"])
    sess.run(None, unet_feed(m, a.batch, one_sample=a.one_sample))
    events = [e for e in json.load(open(sess.end_profiling())) if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    graph = onnx.load(f"{d}/optimized.onnx", load_external_data=False).graph
nodes = list(graph.node)
if [n.op_type for n in nodes] != [e["args"]["op_name"] for e in events]:
    sys.exit("ORT's execution order is not the optimized graph's node order here: cannot replay")
last_read = {x: i for i, n in enumerate(nodes) for x in n.input}
outputs, weights = {o.name for o in graph.output}, {i.name for i in graph.initializer}
live: dict[str, int] = {}
trace, peak, at_peak = [], 0, {}
for i, (n, e) in enumerate(zip(nodes, events)):
    for name, shape in zip(n.output, e["args"].get("output_type_shape") or []):
        dims = next(iter(shape.values()))
        if name and name not in weights:
            live[name] = int(np.prod(dims)) * 4 if dims else 4  # float32 (ints are small)
    total = sum(live.values())
    trace.append(total)
    if total > peak:
        peak, peak_at, at_peak = total, i, dict(live)
    for x in set(n.input):
        if x in live and last_read[x] == i and x not in outputs:
            del live[x]
mib = 2**20
print(f"{m['recipe']['name']} U-Net, batch {a.batch}{' (one sample)' if a.one_sample else ''}: {len(nodes)} nodes; "
      f"peak of live tensors {peak / mib:.0f} MiB at node {peak_at} ({nodes[peak_at].op_type} {nodes[peak_at].name or events[peak_at]['name']})")
print("alive there (MiB):", ", ".join(f"{k} {v / mib:.1f}" for k, v in sorted(at_peak.items(), key=lambda kv: -kv[1])[:8]))
print("highest local peaks (40 nodes apart):")
shown: list[int] = []
for i in np.argsort(trace)[::-1]:
    if all(abs(i - j) > 40 for j in shown):
        shown.append(i)
        print(f"  {trace[i] / mib:6.0f} MiB  node {i:5d}  {nodes[i].op_type} {nodes[i].name or events[i]['name']}")
    if len(shown) >= a.top:
        break
