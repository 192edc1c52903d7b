"""Toy jobs per hour: one at a time, the local pool, and Ray on this machine (personalize-many).

    python -m benchmarks.many_throughput --jobs 8 --steps 200 --out many-throughput

Writes N toy jobs (the shipped toy-64 bundle, a different color x shape concept each, five photos,
``--steps`` steps) and runs them four ways, each into its own run folder, one after another:

- ``plain``: N ``zoodip-edge personalize`` processes in a row (the profile's own threads; no report step);
- ``sequential``: ``personalize-many --jobs 1 --threads-per-job CORES`` (one job at a time, every core);
- ``pool``: ``personalize-many`` as it ships (jobs at once and threads from the cores and memory budget);
- ``ray``: ``personalize-many --ray local`` (starts a Ray instance here, one task per job, 1 CPU each).

The modes run in ``--rounds`` interleaved rounds (plain, sequential, pool, ray, plain, ...), so a
load that comes and goes on a shared machine touches every mode alike; each run records the
load average before it. Ratios are of the per-mode medians, against ``sequential``. Ray's
start-up is timed on its own (``ray.init`` + ``ray.shutdown``), and its per-job overhead is
(ray - start-up - pool) / N. Prints the machine, versions, date and the command, then one JSON object.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", type=Path, required=True, help="folder for the photos, job file and run folders (must not exist)")
    ap.add_argument("--modes", default="plain,sequential,pool,ray")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose a new --out")

    import numpy
    import onnxruntime

    from zoodip_edge import __version__
    from zoodip_edge.cpu import cpu_description
    from zoodip_edge.many import cpus_here
    from zoodip_edge.toy import shipped_path
    from zoodip_edge.toy.world import TOY64, concept_photos

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray, ray_version = None, "not installed"
    cores = cpus_here()
    print(f"machine: {cpu_description()}; {cores} CPUs available to this process")
    print(f"versions: Python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, numpy {numpy.__version__}, "
          f"ray {ray_version}, zoodip-edge {__version__}")
    print(f"date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"command: python {shlex.join(sys.argv)}")

    args.out.mkdir(parents=True)
    bundle = str(shipped_path("bundle"))
    concepts = [(c, s) for c in TOY64.colors for s in TOY64.shapes][: args.jobs]
    lines = []
    for i, (color, shape) in enumerate(concepts):
        concept_photos(args.out / "photos" / f"{color}-{shape}", color, shape, count=5, seed=0)
        lines.append({"name": f"{color}-{shape}", "bundle": bundle, "images": f"photos/{color}-{shape}",
                      "token": f"<{color}-{shape}>", "init": "shape", "steps": args.steps, "seed": i})
    jobs = args.out / "jobs.jsonl"
    jobs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    cli = [sys.executable, "-m", "zoodip_edge.cli"]
    commands = {
        "plain": None,
        "sequential": [*cli, "personalize-many", str(jobs), "--jobs", "1", "--threads-per-job", str(cores)],
        "pool": [*cli, "personalize-many", str(jobs)],
        "ray": [*cli, "personalize-many", str(jobs), "--ray", "local"],
    }
    runs: dict[str, list[dict]] = {m: [] for m in args.modes.split(",")}
    for rnd in range(args.rounds):
        for mode in runs:
            run = args.out / f"{mode}-{rnd}"
            load = os.getloadavg()[0]
            t = time.perf_counter()
            if mode == "plain":
                run.mkdir()
                for x in lines:
                    subprocess.run([*cli, "personalize", bundle, str(args.out / x["images"]), "--token", x["token"],
                                    "--init", "shape", "--steps", str(args.steps), "--seed", str(x["seed"]),
                                    "--out", str(run / f"{x['name']}.safetensors"), "-q"], check=True, capture_output=True)
            else:
                r = subprocess.run([*commands[mode], "--out", str(run)], capture_output=True, text=True)
                if r.returncode != 0:
                    sys.exit(f"error: {mode} failed: {r.stderr[-2000:]}")
            wall = time.perf_counter() - t
            rec = {"wall_s": round(wall, 2), "load_before": round(load, 2)}
            if mode != "plain":
                recs = [json.loads(x) for x in (run / "ledger.jsonl").read_text().splitlines()]
                done = [x for x in recs if x.get("event") == "done"]
                rec["job_seconds_mean"] = round(sum(x["seconds"] for x in done) / len(done), 2)
                # of which personalize's own processes (the rest: the report step, held-out loss and grid)
                rec["train_seconds_mean"] = round(sum(x["train_seconds"] for x in done) / len(done), 2)
                rec["threads_per_job"] = next(x["threads_per_job"] for x in recs if x.get("event") == "run")
            runs[mode].append(rec)
            print(f"round {rnd} {mode:<11} {wall:7.1f} s  {3600 * len(lines) / wall:7.1f} jobs/hour  "
                  f"(load average before: {load:.2f})", flush=True)
    results: dict[str, dict] = {}
    for mode, recs in runs.items():
        wall = statistics.median(r["wall_s"] for r in recs)
        results[mode] = {"median_wall_s": round(wall, 2), "jobs_per_hour": round(3600 * len(lines) / wall, 1), "runs": recs}
    base = results.get("sequential")
    if base:
        for r in results.values():
            r["vs_sequential"] = round(base["median_wall_s"] / r["median_wall_s"], 2)
    if ray is not None and "ray" in results and "pool" in results:
        t = time.perf_counter()
        ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        ray.shutdown()
        startup = time.perf_counter() - t
        results["ray"]["startup_s"] = round(startup, 2)
        results["ray"]["overhead_per_job_s"] = round(
            (results["ray"]["median_wall_s"] - startup - results["pool"]["median_wall_s"]) / len(lines), 2)
    print(json.dumps({"jobs": len(lines), "steps": args.steps, "cores": cores, "results": results}, indent=1))


if __name__ == "__main__":
    main()
