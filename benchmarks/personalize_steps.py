"""One process: a few personalize steps on a bundle; print s/step and peak RSS as JSON.

    python -m benchmarks.personalize_steps BUNDLE --steps 3 --batched|--sequential [--profile-levers]

ORT's arena, memory pattern and buffer reuse are on unless --no-arena / --no-mem-pattern /
--no-mem-reuse say otherwise (arena shrinkage and huge pages off unless --arena-shrink / --hugetlb);
--profile-levers takes them all from the profile instead (what ``personalize`` does).
``--profile cpu-lowmem`` measures that profile (its glibc mmap threshold always applies, and its
``malloc_hugetlb`` restarts this script once with GLIBC_TUNABLES set, as the CLI does; ``--hugetlb``
asks for that with any profile).
GPU profiles (``--profile cuda``, ``cuda-lowvram``; onnxruntime-gpu) also report this process's GPU
memory from NVML: sampled every 50 ms during setup and steps (``nvml_peak_mb``) and at the end.
``s_per_step`` is the median of ``--steps`` steps after ``--warmup`` steps (``first_step_s``: the very first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import GpuMemoryPeak, nvml_used_mb, peak_rss_mb
from zoodip_edge.demo import draw_photos
from zoodip_edge.profiles import resolve_profile
from zoodip_edge.runtime.personalize import Personalizer, Settings
from zoodip_edge.runtime.sessions import hugetlb_restart_env

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--n", type=int, default=None)
g = ap.add_mutually_exclusive_group()
g.add_argument("--batched", dest="batched", action="store_true", default=True)
g.add_argument("--sequential", dest="batched", action="store_false")
ap.add_argument("--no-arena", action="store_true", help="ORT's CPU memory arena off")
ap.add_argument("--no-mem-pattern", action="store_true", help="ORT's memory-pattern planner off")
ap.add_argument("--no-mem-reuse", action="store_true", help="ORT's planner does not hand freed buffers to later tensors")
ap.add_argument("--profile-levers", action="store_true", help="arena, memory pattern and reuse as the profile sets them")
ap.add_argument("--profile", default="cpu", help="device profile (default cpu; e.g. cpu-lowmem)")
ap.add_argument("--warmup", type=int, default=0, help="steps run before the timed ones (GPU: cuDNN's first calls)")
ap.add_argument("--arena-shrink", action="store_true",
                help="ORT's CPU arena on, shrunk after every run (arena_shrinkage; default: the profile's)")
ap.add_argument("--hugetlb", action="store_true", help="malloc_hugetlb on (default: the profile's)")
ap.add_argument("--mmap-threshold-kb", type=int, help="glibc mmap threshold after loading (default: the profile's)")
a = ap.parse_args()
profile = resolve_profile(a.profile)
# Every lever explicit (the cpu profile's own settings do not leak into the comparison).
if not a.profile_levers:
    profile = dataclasses.replace(profile, enable_cpu_mem_arena=not a.no_arena, enable_mem_pattern=not a.no_mem_pattern,
                                  enable_mem_reuse=not a.no_mem_reuse, arena_shrinkage=False, malloc_hugetlb=False,
                                  hugetlb_mmap_threshold_kb=None)
if a.mmap_threshold_kb:
    profile = dataclasses.replace(profile, malloc_mmap_threshold_kb=a.mmap_threshold_kb)
if a.hugetlb:
    profile = dataclasses.replace(profile, malloc_hugetlb=True)
if a.arena_shrink:
    profile = dataclasses.replace(profile, enable_cpu_mem_arena=True, arena_shrinkage=True)
env = hugetlb_restart_env(profile)
if env is not None:  # as the CLI does: glibc reads the tunable only at process start
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)
photos = draw_photos(Path(tempfile.mkdtemp()) / "photos")
gpu = profile.provider_names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
sampler = GpuMemoryPeak() if gpu else None
t0 = time.perf_counter()
p = Personalizer(a.bundle, photos, "<bench>", "dog", settings=Settings(n=a.n, batch_perturbations=a.batched), profile=profile)
setup_s = time.perf_counter() - t0
times = []
for _ in range(a.warmup + a.steps):
    t = time.perf_counter()
    p.step()
    times.append(time.perf_counter() - t)
extra = {}
if gpu:
    peak, source = sampler.stop()
    used, _ = nvml_used_mb()
    extra = {"nvml_peak_mb": peak, "nvml_used_mb": used, "nvml_source": source}
print(json.dumps({"batched": a.batched, "n": p.config.n, "setup_s": setup_s, "s_per_step": float(np.median(times[a.warmup:])),
                  "first_step_s": times[0], "warmup": a.warmup, "step_times_s": [round(x, 4) for x in times],
                  "providers": sorted({q for x in p.sessions.open.values() for q in x.get_providers()}), "losses_finite": bool(np.isfinite(p.last_loss)),
                  "peak_rss_mb": peak_rss_mb(), **extra,
                  "arena": profile.enable_cpu_mem_arena, "mem_pattern": profile.enable_mem_pattern,
                  "mem_reuse": profile.enable_mem_reuse, "profile": profile.name,
                  "mmap_threshold_kb": profile.malloc_mmap_threshold_kb, "hugetlb": profile.malloc_hugetlb, "arena_shrinkage": profile.arena_shrinkage,
                  "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}))
