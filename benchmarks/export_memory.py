"""Peak RSS of one export, stage by stage: the whole process's resident memory sampled every
0.2 s while ``zoodip-edge export`` runs, split at its progress lines.

    python -m benchmarks.export_memory MODEL --recipe int8-cpu --resolution 512 --out export_memory.md

MODEL is a pipeline folder (``benchmarks.build_sdxl`` or ``benchmarks.build_sd15`` make one without
a model hub). The bundle is written to a temporary folder beside ``--out`` (``export-memory-*``, which
.gitignore keeps out of commits) and removed afterwards.
``--memory-limit-gb 16`` runs the export in a cgroup (v1 memory controller, needs root) that
caps everything it holds, page cache of the files it reads and writes included, as a machine with
that much memory would: the export must finish under it. Peak RSS includes the pages of weight files that torch maps from safetensors (diffusers loads
them so) once a forward has read them; RssAnon is the memory that is the process's own.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import header


def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, RssAnon) in MB: all resident pages, and those not backed by a file (the rest are
    mapped weight files, which the kernel can drop and read again)."""
    got = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "RssAnon:")):
                got[line.split(":")[0]] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return got.get("VmRSS", 0.0), got.get("RssAnon", 0.0)


def limited_cgroup(gib: float) -> Path:
    """A new cgroup (v1 memory controller) capped at ``gib`` GiB, without swap."""
    root = Path("/sys/fs/cgroup/memory")
    if not (root / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        sys.exit("--memory-limit-gb needs root and the cgroup v1 memory controller at /sys/fs/cgroup/memory")
    cg = root / f"export-memory-{os.getpid()}"
    cg.mkdir()
    (cg / "memory.limit_in_bytes").write_text(str(int(gib * 2**30)))
    if (cg / "memory.memsw.limit_in_bytes").exists():
        (cg / "memory.memsw.limit_in_bytes").write_text(str(int(gib * 2**30)))
    return cg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--recipe", default="int8-cpu")
    ap.add_argument("--resolution", type=int)
    ap.add_argument("--memory-limit-gb", type=float, help="run under a cgroup memory limit of this many GiB")
    ap.add_argument("--out", type=Path, required=True, help="markdown table; the raw stages and the manifest go beside it as .json")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export-memory-", dir=a.out.parent.resolve()))
    cmd = [str(Path(sys.executable).parent / "zoodip-edge"), "export", a.model, "--out", str(work / "bundle"), "--recipe", a.recipe]
    if a.resolution:
        cmd += ["--resolution", str(a.resolution)]
    stages: list[dict] = [{"stage": "start", "t0": 0.0, "peak_mb": 0.0, "peak_anon_mb": 0.0}]
    t0 = time.perf_counter()
    cgroup = limited_cgroup(a.memory_limit_gb) if a.memory_limit_gb else None
    join = (lambda: (cgroup / "cgroup.procs").write_text(str(os.getpid()))) if cgroup else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=join)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = rss_mb(proc.pid)
            stages[-1]["peak_mb"] = max(stages[-1]["peak_mb"], rss)
            stages[-1]["peak_anon_mb"] = max(stages[-1]["peak_anon_mb"], anon)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    log = []
    for line in proc.stdout:
        line = line.rstrip().replace(str(work), "export-memory-TMP")  # a recorded result names no temporary folder
        log.append(line)
        print(line, flush=True)
        if line.startswith("[export] "):
            rss, anon = rss_mb(proc.pid)
            stages.append({"stage": line[len("[export] "):], "t0": time.perf_counter() - t0, "peak_mb": rss, "peak_anon_mb": anon})
    rc = proc.wait()
    done.set()
    wall = time.perf_counter() - t0
    for s, nxt in zip(stages, [*stages[1:], {"t0": wall}]):
        s["seconds"] = nxt["t0"] - s["t0"]
    limit = ""
    if cgroup:
        used = int((cgroup / "memory.max_usage_in_bytes").read_text()) / 2**30
        limit = (f"; under a cgroup memory limit of {a.memory_limit_gb:g} GiB (page cache included), the cgroup's "
                 f"peak use {used:.1f} GiB, limit hit {int((cgroup / 'memory.failcnt').read_text())} times")
        cgroup.rmdir()
    manifest = work / "bundle" / "manifest.json"
    sizes, m = {}, None
    if manifest.exists():
        m = json.loads(manifest.read_text())
        sizes = {k: sum(f["bytes"] for f in [c, *c.get("external_data", [])]) for k, c in m["components"].items()}
    shutil.rmtree(work, ignore_errors=True)
    peak, anon = max(s["peak_mb"] for s in stages), max(s["peak_anon_mb"] for s in stages)
    rows = "\n".join(f"| {s['stage']} | {s['seconds']:.0f} | {s['peak_mb']:,.0f} | {s['peak_anon_mb']:,.0f} |" for s in stages)
    text = (f"{header(sys.argv)}\nexit code {rc}; {wall:.0f} s; peak RSS **{peak:,.0f} MB**, of it not file-backed "
            f"{anon:,.0f} MB{limit}\n\n| stage (from its progress line to the next) | s | peak RSS MB | peak RssAnon MB |\n"
            f"|---|---|---|---|\n{rows}\n\n"
            + (f"graph sizes (bytes): {json.dumps(sizes)}\n" if sizes else "") + "\n")
    a.out.write_text(text)
    a.out.with_suffix(".json").write_text(json.dumps({"rc": rc, "wall_s": wall, "peak_mb": peak, "peak_anon_mb": anon, "memory_limit": limit.lstrip("; "), "stages": stages,
                                                      "sizes": sizes, "log": log[-40:],
                                                      "manifest": m}, indent=1))  # files' hashes and gate figures, to compare runs
    print(text)
    sys.exit(rc)


if __name__ == "__main__":
    main()
