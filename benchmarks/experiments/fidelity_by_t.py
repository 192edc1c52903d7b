"""ZO fidelity at many (t, ε) draws: how much one probe of the export gate can be trusted.

    python -m benchmarks.experiments.fidelity_by_t PIPELINE BUNDLE [BUNDLE ...] --mu 1e-2 [--t 500,600,700,800,899] [--draws 4]

For each timestep and draw (``verify.make_probe`` with seed 100 + draw: its own z and ε),
central differences at training's step along 16 unit directions vs torch fp32 autograd, as
``verification.zo_fidelity`` does for its three probes. Prints one markdown row per timestep: pearson per bundle and draw.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from benchmarks.common import header
from zoodip_edge.bundle import load_bundle
from zoodip_edge.export import verify
from zoodip_edge.export.load import load_pipeline
from zoodip_edge.profiles import resolve_profile
from zoodip_edge.runtime.sessions import create_session

ap = argparse.ArgumentParser()
ap.add_argument("pipeline", help="the diffusers folder the bundles were exported from (true derivatives)")
ap.add_argument("bundles", nargs="+")
ap.add_argument("--mu", type=float, default=1e-2)
ap.add_argument("--t", default="500,600,700,800,899")
ap.add_argument("--draws", type=int, default=4)
ap.add_argument("--directions", type=int, default=16)
a = ap.parse_args()

p = load_pipeline(a.pipeline)
table = p.text_encoder.get_input_embeddings().weight.detach().numpy().astype(np.float32)
bundles = [load_bundle(b, verify=False) for b in a.bundles]
profile = resolve_profile("cpu")
sessions = [tuple(create_session(b.path(g), profile, b.manifest["session"]["config_entries"]) for g in ("text_encoder", "unet"))
            for b in bundles]
names = " / ".join(f"{Path(b).name}" for b in a.bundles)
rows = [f"pearson ({names}) at μ = {a.mu:g}, {a.directions} directions; columns: draws",
        "| t | " + " | ".join(f"draw {i}" for i in range(a.draws)) + " |", "|---" * (a.draws + 1) + "|"]
for t in (int(x) for x in a.t.split(",")):
    cells = []
    for draw in range(a.draws):
        probe = verify.make_probe(p, bundles[0].manifest["latent_size"], seed=100 + draw, t=t)
        (dirs, exact), = verify.true_derivatives(p, [probe], table.shape[1], a.directions)
        r = [np.corrcoef(verify.central_differences(te, unet, table, probe, dirs, a.mu), exact)[0, 1] for te, unet in sessions]
        cells.append(" / ".join(f"{x:.3f}" for x in r))
    rows.append(f"| {t} | " + " | ".join(cells) + " |")
    print(rows[-1], flush=True)
print(header(sys.argv) + "\n" + "\n".join(rows))
