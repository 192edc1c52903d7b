"""ZO fidelity of bundles' text encoder + U-Net at several μ (the export gate's measurement, swept).

    python -m benchmarks.fidelity_by_mu PIPELINE BUNDLE [BUNDLE ...] --mu 1e-3,1e-2,3e-2

The export gate measures fidelity at the bundle's training μ only; this sweeps μ to find where
a recipe's finite differences start to follow the true derivatives. μ as in training (a step
of norm μ·√d, like RGE's μ·e with e ~ N(0, I_d)). Same probes (three timesteps across
the first bundle's PUTS range) and 8 directions as ``verification.zo_fidelity`` (torch fp32
autograd once, then central differences per bundle and μ), sessions with the ``cpu`` profile
unless ``--profile`` names another (``cuda``: the same measurement on ORT's CUDA EP).
"""

from __future__ import annotations

import argparse
import sys
import time
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
ap.add_argument("--mu", default="1e-3,1e-2,3e-2")
ap.add_argument("--directions", type=int, default=8)
ap.add_argument("--profile", default="cpu", help="device profile of the bundles' sessions (default cpu)")
ap.add_argument("--out", type=Path)
a = ap.parse_args()

first = load_bundle(a.bundles[0], verify=False).manifest
p = load_pipeline(a.pipeline)
d = first["defaults"]
probes = verify.fidelity_probes(p, first["latent_size"], d["t_low"], d["t_high"])
truth = verify.true_derivatives(p, probes, first["text"]["hidden_size"], a.directions)
table = p.text_encoder.get_input_embeddings().weight.detach().numpy().astype(np.float32)
del p

ts = " | ".join(f"t = {pr.t}" for pr in probes)
rows = [f"| bundle | recipe | providers | μ | step norm | pearson (worst probe) | {ts} | rel. error (worst) | s |", "|---" * (8 + len(probes)) + "|"]
profile = resolve_profile(a.profile)
for path in a.bundles:
    b = load_bundle(path, verify=False)
    config = b.manifest["session"]["config_entries"]
    te, unet = create_session(b.path("text_encoder"), profile, config), create_session(b.path("unet"), profile, config)
    for mu in (float(x) for x in a.mu.split(",")):
        t = time.perf_counter()
        f = verify.fidelity_report(te, unet, table, probes, truth, mu)
        per = " | ".join(f"{r['pearson']:.3f}" for r in f["probes"])
        rows.append(f"| {Path(path).name} | {b.manifest['recipe']['name']} | {unet.get_providers()[0]} | {mu:g} | {f['step_norm']:.3g} | "
                    f"{f['pearson']:.3f} | {per} | {f['rel_err']:.3g} | {time.perf_counter() - t:.0f} |")
        print(rows[-1], flush=True)
    del te, unet
out = header(sys.argv) + "\n" + "\n".join(rows)
print(out)
if a.out:
    a.out.write_text(out + "\n")
