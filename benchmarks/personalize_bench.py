"""Personalize benchmark: s/step and peak RSS, batched vs sequential perturbations, CPU EP.

Each configuration runs in its own process so peaks do not mix.

    python benchmarks/personalize_bench.py BUNDLE [BUNDLE...] --steps 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import header, run_measured  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("bundles", nargs="+")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--out", type=Path)
ap.add_argument("--torch-pipeline", help="diffusers folder of the same model: adds torch fp32 baselines")
a = ap.parse_args()
rows = []


def measure(label: str, mode: str, cmd: list[str]) -> None:
    """Run one configuration in its own process and add its table row."""
    r = run_measured(cmd)
    if r["rc"] != 0 or not r["result"]:
        rows.append(f"| {label} | {mode} | failed: {r['stderr'].strip().splitlines()[-1:]} |")
    else:
        res = r["result"]
        n = res["n"] if mode != "-" else "-"
        rows.append(f"| {label} | {mode} | {n} | {res['setup_s']:.1f} | {res['first_step_s']:.1f} | "
                    f"{res['s_per_step']:.2f} | {res['peak_rss_mb']:.0f} |")
    print(rows[-1], flush=True)


script = str(Path(__file__).parent / "personalize_steps.py")
for bundle in a.bundles:
    recipe = json.loads((Path(bundle) / "manifest.json").read_text())["recipe"]["name"]
    for mode in ("--batched", "--sequential"):
        measure(recipe, mode[2:], [sys.executable, script, bundle, "--steps", str(a.steps), mode])
if a.torch_pipeline:
    script = str(Path(__file__).parent / "torch_steps.py")
    modes = [("zo", "torch fp32, forward-only ZO (batched)"), ("grad", "torch fp32, gradient TI (batch 1)")]
    if importlib.util.find_spec("optimum") and importlib.util.find_spec("optimum.quanto"):
        modes.append(("quanto", "torch + optimum-quanto int8 weights, forward-only ZO (batched)"))
    else:
        print("optimum-quanto not installed: skipping the paper's torch + quanto baseline", file=sys.stderr)
    for mode, label in modes:
        measure(label, "-" if mode == "grad" else "batched",
                [sys.executable, script, a.torch_pipeline, "--mode", mode, "--steps", str(a.steps)])
table = "\n".join([header(sys.argv), "", "| recipe | perturbations | n | setup s (load + VAE encode) | first step s | s/step (median) | peak RSS MB |",
                   "|---|---|---|---|---|---|---|", *rows])
print(table)
if a.out:
    a.out.write_text(table + "\n")
