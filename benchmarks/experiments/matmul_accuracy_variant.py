"""Copy an int8-cpu bundle with its U-Net's MatMulNBits computing in int8 (accuracy level 4).

The ``int8-cpu-fast`` recipe is this with ``--keep-float encoder_hidden_states``; the script
makes the variants it was chosen from without an export.

    python -m benchmarks.experiments.matmul_accuracy_variant BUNDLE OUT [--level 4] [--graphs unet] [--keep-float encoder_hidden_states]

The experiment: W8A8 in the MatMuls only (ORT rounds each MatMul's input
to int8 per block of 32 along K and multiplies in int8; convolutions stay float). The copy
hard-links every file it does not change; the changed graphs get new sha256/bytes in the
manifest, and the manifest's recipe says what was changed. Its verification figures are the
source bundle's: measure the copy's fidelity with ``fidelity_by_mu.py`` (docs/recipes.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from zoodip_edge.bundle import load_bundle, rewrite_graph, write_manifest
from zoodip_edge.export.quantize import int8_matmul_compute


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--level", type=int, default=4, help="MatMulNBits accuracy_level (0: float compute, 4: int8)")
    ap.add_argument("--graphs", default="unet", help="comma-separated bundle graphs to change")
    ap.add_argument("--keep-float", default="", help="comma-separated tensors whose MatMulNBits readers keep float compute "
                    "(encoder_hidden_states: the cross-attention K/V projections, where the perturbation enters the U-Net)")
    a = ap.parse_args()
    manifest = load_bundle(a.bundle).manifest  # verified: the copy starts from an intact bundle
    shutil.copytree(a.bundle, a.out, copy_function=os.link)
    keep_float = tuple(filter(None, a.keep_float.split(",")))
    changed = {graph: rewrite_graph(a.out, manifest, graph, lambda m: int8_matmul_compute(m, keep_float, a.level))
               for graph in a.graphs.split(",")}
    manifest["recipe"]["variant"] = (f"MatMulNBits accuracy_level {a.level} in {changed}, "
                                     f"except readers of {a.keep_float or 'nothing'} (benchmarks/experiments/matmul_accuracy_variant.py); "
                                     "verification figures are the source bundle's")
    write_manifest(a.out, manifest)
    print(json.dumps({"out": str(a.out), "matmulnbits_changed": changed}))


if __name__ == "__main__":
    main()
