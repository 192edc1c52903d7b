"""Personalize benchmark: zoodip-edge against the torch ways, side by side, CPU.

    python -m benchmarks.personalize_bench BUNDLE [BUNDLE...] --torch-pipeline PIPELINE [--n 2] [--steps 3] [--ours cpu,batched]
                                           [--torch-modes quanto,grad,zo]
    python -m benchmarks.personalize_bench BUNDLE [BUNDLE...] --scaling [--steps 3] [--ours batched]

Rows, each in its own process so peaks do not mix:
1. zoodip-edge on each bundle: perturbations one by one with the ``cpu`` profile's memory settings
   (ORT arena shrunk after every run; memory pattern and buffer reuse off; glibc huge pages), with
   the ``cpu-lowmem`` profile, one by one with the arena and buffer reuse on (no shrinkage), and
   batched as the ``cpu`` profile ships (``--ours`` picks: cpu, cpu-lowmem, reuse, batched).
2. the paper's way: torch, weights int8 by optimum-quanto, forward-only ZO (``.[bench]`` extra);
3. gradient textual inversion in torch fp32 (one trainable row, autograd, Adam);
4. forward-only ZO in torch fp32.
The torch rows run at the first bundle's resolution.
A step is n + 1 text-encoder + U-Net passes for ZO, one forward + backward for gradient TI;
"s/pass" is s/step / (n + 1). The table gives s/step and peak RSS as ratios against (2), (3) and
(4) measured in the same run. ``--scaling`` instead runs n = 1, 2, 4 on each bundle (export one
bundle per resolution with ``--resolution``), for each ``--ours`` row: by default ``batched``, the
``cpu`` profile as it ships.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from benchmarks.common import header, run_measured

# each measured run is its own process, started from the repository root
OURS = [sys.executable, "-m", "benchmarks.personalize_steps"]
TORCH = [sys.executable, "-m", "benchmarks.torch_steps"]


# --ours rows: label, personalize_steps.py flags
OURS_ROWS = {
    "cpu": ("one by one, `cpu` profile's memory settings (arena shrunk after every run; memory pattern, buffer reuse off; huge pages, 4 MiB mmap threshold)",
            ["--sequential", "--profile-levers"]),
    "cpu-lowmem": ("one by one, `cpu-lowmem` profile (arena, memory pattern, buffer reuse off; mmap threshold 1 MiB, huge pages)",
                   ["--sequential", "--profile-levers", "--profile", "cpu-lowmem"]),
    "reuse": ("one by one, arena on, memory pattern off, buffer reuse on", ["--sequential", "--no-mem-pattern"]),
    "batched": ("batched, `cpu` profile (as it ships)", ["--batched", "--profile-levers"]),
}


def measure(cmd: list[str]) -> dict | str:
    """One configuration in its own process: its JSON result plus the process's peak RSS, or an error line."""
    r = run_measured(cmd)
    if r["rc"] != 0 or not r["result"]:
        return f"failed: {(r['stderr'].strip().splitlines() or ['no output'])[-1]}"
    return {**r["result"], "peak_rss_mb": r["peak_rss_mb"]}


def ratio(x: float, base: dict | str | None, key: str) -> str:
    return f"{x / base[key]:.2f}×" if isinstance(base, dict) else "–"


def compare(a: argparse.Namespace) -> list[str]:
    n, steps = str(a.n), str(a.steps)
    configs = []
    # bundles inner: with several bundles, each configuration runs for all of them back to back
    for row in a.ours.split(","):
        what, flags = OURS_ROWS[row]
        for bundle in a.bundles:
            m = json.loads((Path(bundle) / "manifest.json").read_text())
            wino = sum(m["recipe"].get("graphs", {}).get("unet", {}).get("winograd_convs", {}).values())
            shared = m["recipe"].get("graphs", {}).get("unet", {}).get("shared_prefix_nodes")
            name = (f"(1) zoodip-edge {m['recipe']['name']} {m['resolution']} px" + (f", {wino} Winograd convs" if wino else "")
                    + (", shared prefix" if shared else ""))
            if len(a.bundles) > 1:
                name += f" (`{Path(bundle).name}`)"
            configs.append((f"{name}, {what}", "zo", [*OURS, bundle, "--steps", steps, "--n", n, *flags]))
    baselines = {}
    if a.torch_pipeline:
        torch_rows = [("quanto", "(2) torch + optimum-quanto int8 weights, forward-only ZO (paper)"),
                      ("grad", "(3) torch fp32 gradient TI"), ("zo", "(4) torch fp32 forward-only ZO")]
        torch_rows = [r for r in torch_rows if r[0] in a.torch_modes.split(",")]
        if any(r[0] == "quanto" for r in torch_rows) and not (importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto")):
            print("optimum-quanto not installed (pip install '.[bench]'): no row (2)", file=sys.stderr)
            torch_rows = [r for r in torch_rows if r[0] != "quanto"]
        resolution = json.loads((Path(a.bundles[0]) / "manifest.json").read_text())["resolution"]  # torch at the bundle's size
        for mode, label in torch_rows:
            configs.append((label, mode, [*TORCH, a.torch_pipeline, "--mode", mode, "--steps", steps, "--n", n,
                                          "--resolution", str(resolution)]))
    results = []
    for label, mode, cmd in configs:
        res = measure(cmd)
        results.append((label, mode, res))
        print(label, json.dumps(res), file=sys.stderr, flush=True)
        if label[:3] in ("(2)", "(3)", "(4)"):
            baselines[label[:3]] = res
    q, g, z = baselines.get("(2)"), baselines.get("(3)"), baselines.get("(4)")
    rows = ["| configuration | n | setup s | s/step | s/pass | peak RSS MB | s/step vs (2) | s/step vs (4) | "
            "peak vs (2) | peak vs (3) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, mode, res in results:
        if isinstance(res, str):
            rows.append(f"| {label} | {a.n} | {res} |||||||")
            continue
        passes = 1 if mode == "grad" else res["n"] + 1
        rows.append(f"| {label} | {'-' if mode == 'grad' else res['n']} | {res['setup_s']:.1f} | {res['s_per_step']:.2f} | "
                    f"{res['s_per_step'] / passes:.2f} | {res['peak_rss_mb']:.0f} | {ratio(res['s_per_step'], q, 's_per_step')} | "
                    f"{ratio(res['s_per_step'], z, 's_per_step')} | {ratio(res['peak_rss_mb'], q, 'peak_rss_mb')} | "
                    f"{ratio(res['peak_rss_mb'], g, 'peak_rss_mb')} |")
    return rows


def scaling(a: argparse.Namespace) -> list[str]:
    rows = ["| configuration | resolution | n | s/step | s/pass | peak RSS MB |", "|---|---|---|---|---|---|"]
    for row in a.ours.split(","):
        what, flags = OURS_ROWS[row]
        for bundle in a.bundles:
            res_px = json.loads((Path(bundle) / "manifest.json").read_text())["resolution"]
            for n in (1, 2, 4):
                r = measure([*OURS, bundle, "--steps", str(a.steps), "--n", str(n), *flags])
                rows.append(f"| {what} | {res_px} | {n} | {r} |||" if isinstance(r, str) else
                            f"| {what} | {res_px} | {n} | {r['s_per_step']:.2f} | {r['s_per_step'] / (n + 1):.2f} | {r['peak_rss_mb']:.0f} |")
                print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--ours", help="zoodip-edge rows, comma separated: cpu, cpu-lowmem, reuse (arena + buffer reuse on), "
                    "batched (default: all four; with --scaling, batched, as the cpu profile ships)")
    ap.add_argument("--torch-pipeline", help="diffusers folder of the same model: adds the torch rows (2)-(4)")
    ap.add_argument("--torch-modes", default="quanto,grad,zo",
                    help="torch rows, comma separated: quanto (2), grad (3), zo (4) (e.g. zo alone where gradient TI does not fit)")
    ap.add_argument("--scaling", action="store_true", help="n = 1, 2, 4 on each bundle (one per resolution), each --ours row")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    a.ours = a.ours or ("batched" if a.scaling else "cpu,cpu-lowmem,reuse,batched")
    rows = scaling(a) if a.scaling else compare(a)
    threads = "Threads: ORT and torch at their defaults (one per core)."
    table = "\n".join([header(sys.argv), threads, "", *rows])
    print(table)
    if a.out:
        a.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
