"""Which large buffers live during one U-Net forward, and for how long (glibc/Linux, needs gcc).

    python -m benchmarks.experiments.malloc_log BUNDLE [--mem-reuse on|off] [--min-life 1.0]

Builds ``malloc_log.c`` into an LD_PRELOAD library, runs one warm U-Net forward under it with the
``cpu`` profile (``--mem-reuse`` overrides the profile's ORT buffer reuse), and prints the peak of
live blocks >= 256 KiB allocated during the forward, what is live at that peak, and the blocks that
lived longer than ``--min-life`` seconds. Timing under the logger is ~2x slower than normal.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
CHILD = """
import ctypes, dataclasses, sys
from benchmarks.common import unet_feed
from zoodip_edge.bundle import load_bundle
from zoodip_edge.profiles import resolve_profile
from zoodip_edge.runtime.sessions import create_session
bundle, reuse, lib, out = sys.argv[1:5]
b = load_bundle(bundle, verify=False); m = b.manifest
profile = resolve_profile("cpu")
if reuse != "profile":
    profile = dataclasses.replace(profile, enable_mem_reuse=reuse == "on")
sess = create_session(b.path("unet"), profile, m["session"]["config_entries"])
feed = unet_feed(m)
sess.run(None, feed)
log = ctypes.CDLL(lib)
log.mlog_start(out.encode()); sess.run(None, feed); log.mlog_stop()
"""

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--mem-reuse", choices=["on", "off", "profile"], default="profile")
ap.add_argument("--min-life", type=float, default=1.0)
a = ap.parse_args()
with tempfile.TemporaryDirectory() as d:
    lib, out = Path(d) / "malloc_log.so", Path(d) / "log.txt"
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(lib), str(HERE / "malloc_log.c"), "-ldl"], check=True)
    subprocess.run([sys.executable, "-c", CHILD, a.bundle, a.mem_reuse, str(lib), str(out)], check=True,
                   env={**os.environ, "LD_PRELOAD": str(lib)})
    events = [line.split() for line in out.read_text().splitlines()]
t0 = float(events[0][1])
live: dict[str, tuple[float, int]] = {}
cur = peak = 0
peak_live: dict = {}
spans = []
for op, t, ptr, size, _ in events:
    if op == "+":
        live[ptr] = (float(t) - t0, int(size))
        cur += int(size)
        if cur > peak:
            peak, peak_live, peak_t = cur, dict(live), float(t) - t0
    elif ptr in live:
        born, size_ = live.pop(ptr)
        cur -= size_
        spans.append((born, float(t) - t0, size_))
mib = 2**20
print(f"forward under the logger: {float(events[-1][1]) - t0:.1f} s; peak of live blocks >= 256 KiB: {peak / mib:.0f} MiB "
      f"at {peak_t:.2f} s, in {len(peak_live)} blocks")
print("live at the peak (allocated at, MiB):", ", ".join(f"{b:.2f}s {s / mib:.1f}" for b, s in sorted(peak_live.values())))
print(f"blocks that lived longer than {a.min_life} s (allocated, freed, MiB):")
for born, died, size in sorted(spans):
    if died - born > a.min_life:
        print(f"  {born:6.2f} {died:6.2f} {size / mib:7.2f}")
