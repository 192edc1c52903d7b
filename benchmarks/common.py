"""Shared by the benchmark scripts: run a command in its own process and read its peak RSS (and GPU memory)."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path


def machine() -> str:
    import numpy
    import onnxruntime

    from zoodip_edge.cpu import cpu_description

    return (f"{platform.node()}: {cpu_description()}, Python {platform.python_version()}, "
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


def command(argv: list[str]) -> str:
    """The command line that reproduces a run from the repository root (``python -m`` for a script in it)."""
    root, script = Path(__file__).resolve().parent.parent, Path(argv[0]).resolve()
    if script.is_relative_to(root) and script.suffix == ".py":
        argv = ["-m", ".".join(script.relative_to(root).with_suffix("").parts), *argv[1:]]
    return "python " + " ".join(shlex.quote(a) for a in argv)


def recorded_argv(argv: list[str]) -> list[str]:
    """``argv`` with a script in the repository named from its root, as results record it (no
    machine's paths)."""
    root, script = Path(__file__).resolve().parent.parent, Path(argv[0]).resolve()
    return [str(script.relative_to(root)) if script.is_relative_to(root) else script.name, *argv[1:]]


def header(argv: list[str]) -> str:
    return f"Machine: {machine()}\n\nCommand: `{command(argv)}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"


def median_s(run, repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` calls of ``run()``, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def unet_feed(manifest: dict, batch: int = 1, t: int = 700, one_sample: bool = False) -> dict:
    """Seeded random U-Net inputs of a bundle's shapes, read from its manifest's graph inputs (SDXL's
    added conditions included); weights and values change neither memory nor speed.

    ``one_sample``: sample and timestep with one row for the batch of conditions, as the runtime
    feeds a U-Net with a shared prefix (export/prefix.py).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    rows = 1 if one_sample else batch
    feed = {}
    for entry in manifest["components"]["unet"]["inputs"]:
        name = entry["name"]
        first = rows if name in ("sample", "timestep") else batch
        shape = [first, *entry["shape"][1:]]
        if name == "timestep":
            feed[name] = np.full(shape, t, np.float32)
        elif name == "time_ids":  # original size, crop, target size, as the runtime feeds them
            r = float(manifest["resolution"])
            feed[name] = np.tile(np.array([r, r, 0, 0, r, r], np.float32), (first, 1))
        else:
            feed[name] = rng.standard_normal(shape, dtype=np.float32)
    return feed


def profiling_options(manifest: dict, prefix: str):
    """ORT session options that profile every node, with the bundle's session config and no memory pattern."""
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.enable_mem_pattern = False
    o.enable_profiling = True
    o.profile_file_prefix = prefix
    for k, v in manifest["session"]["config_entries"].items():
        o.add_session_config_entry(k, v)
    return o


def nvml_used_mb(index: int = 0, uuid: str = "") -> tuple[float | None, str]:
    """This process's GPU memory from NVML (what nvidia-smi shows: context + allocator reserve).

    The GPU is the one whose UUID contains ``uuid``, else number ``index``. Falls back to the whole
    device's used memory when NVML does not list our pid (containers with their own pid
    namespace); None when pynvml (nvidia-ml-py) is missing or NVML fails.
    """
    try:
        import pynvml
    except ImportError:
        return None, "pynvml not importable"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - any NVML failure only loses this number
        return None, f"nvmlInit failed: {e}"
    try:
        handle = None
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            u = pynvml.nvmlDeviceGetUUID(h)
            if uuid and uuid in (u.decode() if isinstance(u, bytes) else str(u)):
                handle = h
                break
        handle = handle or pynvml.nvmlDeviceGetHandleByIndex(index)
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory is not None:
                return proc.usedGpuMemory / 2**20, "process"
        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20, "device_used (pid not listed)"
    except Exception as e:  # noqa: BLE001
        return None, f"nvml error: {e}"
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


class GpuMemoryPeak:
    """Samples ``nvml_used_mb`` every ``every_s`` seconds in a thread until ``stop()``: ORT's CUDA
    arena reports no peak of its own, and NVML shows only the present."""

    def __init__(self, every_s: float = 0.05):
        self.peak_mb: float | None = None
        self.source = "not sampled"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(every_s,), daemon=True)
        self._thread.start()

    def _poll(self, every_s: float) -> None:
        while True:
            used, self.source = nvml_used_mb()
            if used is not None:
                self.peak_mb = max(self.peak_mb or 0.0, used)
            if self._stop.wait(every_s):
                return

    def stop(self) -> tuple[float | None, str]:
        self._stop.set()
        self._thread.join()
        return self.peak_mb, self.source
