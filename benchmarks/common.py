"""Shared by the benchmark scripts: run a command in its own process and read its peak RSS."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import time


def machine() -> str:
    import numpy
    import onnxruntime

    cpu = "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
            f"onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}")


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd`` in a child process (its own peak RSS, not mixed with ours); parse a JSON last line if any."""
    wrapper = (
        "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024; "
        "print(json.dumps({'rc': r.returncode, 'wall_s': time.perf_counter() - t, 'peak_rss_mb': peak, "
        "'stdout': r.stdout[-4000:], 'stderr': r.stderr[-2000:]}))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    lines = [x for x in res["stdout"].strip().splitlines() if x.startswith("{")]
    res["result"] = json.loads(lines[-1]) if lines else None
    return res


def header(argv: list[str]) -> str:
    return f"Machine: {machine()}\n\nCommand: `python {' '.join(shlex.quote(a) for a in argv)}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unet_feed(manifest: dict, batch: int = 1, t: int = 700) -> dict:
    """Seeded random U-Net inputs of a bundle's shapes (weights and values change neither memory nor speed)."""
    import numpy as np

    h, length, d = manifest["latent_size"], manifest["text"]["max_length"], manifest["text"]["hidden_size"]
    rng = np.random.default_rng(0)
    return {"sample": rng.standard_normal((batch, manifest["latent_channels"], h, h), dtype=np.float32),
            "timestep": np.full((batch,), t, np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, length, d), dtype=np.float32)}
