"""One process per ORT session lever: peak RSS and s/forward of a bundle's U-Net, batch 1, CPU EP.

    python benchmarks/unet_memory_levers.py BUNDLE [--levers default no-arena ...]

Each lever runs in its own child process so peaks do not mix; prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import header, run_measured  # noqa: E402

LEVERS = {
    "default": {},
    "no-arena": {"arena": False},
    "no-mem-pattern": {"mem_pattern": False},
    "no-arena+no-mem-pattern": {"arena": False, "mem_pattern": False},
    "no-prepacking": {"config": {"session.disable_prepacking": "1"}},
    "no-arena+no-prepacking": {"arena": False, "config": {"session.disable_prepacking": "1"}},
}

CHILD = r"""
import json, resource, sys, time
import numpy as np, onnxruntime as ort
from zoodip_edge.bundle import load_bundle
bundle, lever, repeat = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
b = load_bundle(bundle, verify=False)
m = b.manifest
so = ort.SessionOptions()
so.enable_cpu_mem_arena = lever.get("arena", True)
so.enable_mem_pattern = lever.get("mem_pattern", True)
for k, v in {**m["session"]["config_entries"], **lever.get("config", {})}.items():
    so.add_session_config_entry(k, v)
t = time.perf_counter()
s = ort.InferenceSession(str(b.path("unet")), so, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - t
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
h, d = m["latent_size"], m["components"]["unet"]["inputs"][2]["shape"][2]
L = m["text"]["max_length"]
rng = np.random.default_rng(0)
feed = {"sample": rng.standard_normal((1, 4, h, h), dtype=np.float32), "timestep": np.full((1,), 700, np.float32),
        "encoder_hidden_states": rng.standard_normal((1, L, d), dtype=np.float32)}
times = []
for _ in range(repeat):
    t = time.perf_counter(); s.run(None, feed); times.append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "rss_after_load_mb": after_load, "first_s": times[0],
                  "s_per_forward": float(np.median(times[1:] or times))}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("--levers", nargs="+", default=list(LEVERS))
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    rows = []
    for name in a.levers:
        r = run_measured([sys.executable, "-c", CHILD, a.bundle, json.dumps(LEVERS[name]), str(a.repeat)])
        if r["rc"] != 0:
            rows.append(f"| {name} | failed: {r['stderr'].strip().splitlines()[-1] if r['stderr'].strip() else r['rc']} | | | |")
            continue
        res = r["result"]
        rows.append(f"| {name} | {r['peak_rss_mb']:.0f} | {res['rss_after_load_mb']:.0f} | {res['first_s']:.2f} | {res['s_per_forward']:.2f} |")
        print(rows[-1], file=sys.stderr, flush=True)
    print(header(sys.argv))
    print("| lever | peak RSS MB | RSS after load MB | first forward s | s/forward (median of the rest) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
