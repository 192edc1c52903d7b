"""One process: load a bundle's U-Net on CPU EP, time forwards at a batch size, print JSON.

    python -m benchmarks.unet_forward BUNDLE --batch 1 --repeat 2 [--arena on|off] [--mem-pattern on|off]
                                      [--mem-reuse on|off] [--mmap-threshold-kb N] [--config KEY=VALUE ...]
                                      [--one-sample]

Session options are the ``cpu`` profile's (what ``personalize`` uses) unless overridden; the
bundle's own session config entries apply, plus any ``--config`` entries.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from benchmarks.common import peak_rss_mb, unet_feed
from zoodip_edge.bundle import load_bundle
from zoodip_edge.profiles import resolve_profile
from zoodip_edge.runtime.sessions import create_session

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--repeat", type=int, default=2)
ap.add_argument("--arena", choices=["on", "off"], help="ORT's CPU memory arena (default: the cpu profile's)")
ap.add_argument("--mem-pattern", choices=["on", "off"], help="ORT's memory-pattern planner (default: the cpu profile's)")
ap.add_argument("--mem-reuse", choices=["on", "off"], help="ORT's buffer reuse (default: the cpu profile's)")
ap.add_argument("--mmap-threshold-kb", type=int, help="glibc mmap threshold after loading (default: the cpu profile's, 32 MiB)")
ap.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="extra session config entries")
ap.add_argument("--one-sample", action="store_true", help="sample/timestep with batch 1 (a U-Net with a shared prefix)")
a = ap.parse_args()
b = load_bundle(a.bundle, verify=False)
m = b.manifest
profile = resolve_profile("cpu")
if a.arena:
    profile = dataclasses.replace(profile, enable_cpu_mem_arena=a.arena == "on", arena_shrinkage=a.arena == "on")
if a.mem_pattern:
    profile = dataclasses.replace(profile, enable_mem_pattern=a.mem_pattern == "on")
if a.mem_reuse:
    profile = dataclasses.replace(profile, enable_mem_reuse=a.mem_reuse == "on")
if a.mmap_threshold_kb:
    profile = dataclasses.replace(profile, malloc_mmap_threshold_kb=a.mmap_threshold_kb)
config = {**m["session"]["config_entries"], **dict(kv.split("=", 1) for kv in a.config)}
t0 = time.perf_counter()
sess = create_session(b.path("unet"), profile, config)
load_s = time.perf_counter() - t0
rss_after_load = peak_rss_mb()
feed = unet_feed(m, a.batch, one_sample=a.one_sample)
t = time.perf_counter()
sess.run(None, feed)  # warm-up (first run allocates and prepacks)
first_s = time.perf_counter() - t
times = []
for _ in range(a.repeat):
    t = time.perf_counter()
    sess.run(None, feed)
    times.append(time.perf_counter() - t)
print(json.dumps({"batch": a.batch, "one_sample": a.one_sample, "load_s": load_s, "first_s": first_s, "s_per_forward": float(np.median(times)),
                  "rss_after_load_mb": rss_after_load, "peak_rss_mb": peak_rss_mb(),
                  "arena": profile.enable_cpu_mem_arena, "mem_pattern": profile.enable_mem_pattern,
                  "mem_reuse": profile.enable_mem_reuse, "mmap_threshold_kb": profile.malloc_mmap_threshold_kb}))
