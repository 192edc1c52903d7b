"""ZO fidelity and conditioning per recipe on the tiny SD1/SD2 pipelines (random weights).

    python -m benchmarks.experiments.recipe_fidelity --work fidelity-work [--out table.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import header
from zoodip_edge.export import RECIPES, export_bundle
from zoodip_edge.export.tiny import build_tiny_pipeline

ap = argparse.ArgumentParser()
ap.add_argument("--work", type=Path, required=True)
ap.add_argument("--out", type=Path)
a = ap.parse_args()
rows = ["| family | recipe | μ | step norm | ZO fidelity pearson | rel. error of the finite differences | conditioning kept | gate |",
        "|---|---|---|---|---|---|---|---|"]
for family in ("sd1", "sd2"):
    pipe = a.work / f"tiny-{family}"
    if not (pipe / "model_index.json").exists():
        build_tiny_pipeline(pipe, family)
    for recipe in RECIPES:
        m = export_bundle(str(pipe), a.work / f"{family}-{recipe}", recipe=recipe, force=True, allow_unfaithful=True)
        f, c = m["verification"]["zo_fidelity"], m["verification"]["conditioning_sensitivity"]
        rows.append(f"| {family} | {recipe} | {f['mu']:g} | {f['step_norm']:.3g} | {f['pearson']:.4f} | {f['rel_err']:.3g} | {c['ratio']:.3f} | "
                    f"{'passes' if f['passed'] else 'refused'} |")
        print(rows[-1], flush=True)
table = header(sys.argv) + "\n" + "\n".join(rows)
print(table)
if a.out:
    a.out.write_text(table + "\n")
