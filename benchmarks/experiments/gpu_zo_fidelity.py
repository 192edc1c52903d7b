"""Does the paper's torch way keep the finite-difference signal? ZO fidelity in torch, per precision.

    python -m benchmarks.experiments.gpu_zo_fidelity PIPELINE [--device cuda] [--k 8] [--mu 1e-3,1e-2]

The export gate's measurement (zoodip_edge/export/verify.py) done in torch on a GPU instead of in
ORT: the gate's three probes (t = 500, 699, 899: SD1's PUTS range, each its own z and ε), its
k unit directions per probe and its true derivatives (torch fp32 autograd on the CPU); central
differences stepping mu * sqrt(d) as training does (RGE's mu * e, e ~ N(0, I_d)). The worst
probe's pearson is the gate's verdict (>= 0.95). Rows: fp32 with cuDNN TF32 on (torch's default)
and off, fp16 activations (the paper's setting), optimum-quanto int8 weights with fp16 (the
paper's setting) and fp32 activations. One JSON line per (row, mu), then a markdown table.
(Before the gate's correction: one probe at t = 700 and a step of mu, not
mu * sqrt(d); docs/results/2026-11-27-h200/torch_zo_fidelity_unit_step_*.txt are on that older scale.)
"""

from __future__ import annotations

import argparse
import copy
import json

import numpy as np
import torch

from zoodip_edge.export.graphs import TextEncoderFromEmbeddings, UNetWrapper
from zoodip_edge.export.load import load_pipeline
from zoodip_edge.export.verify import fidelity_probes, perturbed_embeddings, rel_err, training_step, true_derivatives
from zoodip_edge.families import defaults_for

ap = argparse.ArgumentParser()
ap.add_argument("pipeline")
ap.add_argument("--device", default="cuda")
ap.add_argument("--k", type=int, default=8, help="directions per probe (the gate's 8)")
ap.add_argument("--mu", default="1e-3,1e-2")
a = ap.parse_args()
dev = torch.device(a.device)
p = load_pipeline(a.pipeline)
d = defaults_for(p.family)
probes = fidelity_probes(p, p.unet.config.sample_size, d.t_low, d.t_high)
table = p.text_encoder.get_input_embeddings().weight.detach()
table_np = table.numpy().astype(np.float32)
truth = true_derivatives(p, probes, table.shape[1], a.k)  # fp32 autograd, CPU: as the gate computes it


def modules(dtype: torch.dtype, quanto: bool):
    te, unet = copy.deepcopy(p.text_encoder), copy.deepcopy(p.unet)
    te.to(dev, dtype), unet.to(dev, dtype)
    if quanto:
        from optimum.quanto import freeze, qint8, quantize

        for m in (te, unet):
            quantize(m, weights=qint8)
            freeze(m)
    return TextEncoderFromEmbeddings(te).eval(), UNetWrapper(unet).eval()


def central_differences(te, unet, probe, dirs: np.ndarray, mu: float, dtype: torch.dtype) -> np.ndarray:
    embeds, h = perturbed_embeddings(table_np, probe, dirs, mu)  # the gate's perturbations
    k, batch = len(dirs), torch.from_numpy(embeds)
    zt, target = torch.from_numpy(probe.zt).to(dev), torch.from_numpy(probe.target).to(dev)
    out = []
    with torch.no_grad():
        for e in batch.split(8):
            b = len(e)
            pred = unet(zt.to(dtype).repeat(b, 1, 1, 1), torch.full((b,), float(probe.t), device=dev), te(e.to(dev, dtype))[0])
            out.append(((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).double().cpu())
    ls = torch.cat(out).numpy()
    return (ls[:k] - ls[k:]) / (2 * h)


rows = []
for label, dtype, quanto, tf32 in (("fp32, cuDNN TF32 on (torch default)", torch.float32, False, True),
                                   ("fp32, TF32 off", torch.float32, False, False),
                                   ("fp16 activations (paper)", torch.float16, False, True),
                                   ("quanto int8 weights + fp16 activations (paper)", torch.float16, True, True),
                                   ("quanto int8 weights + fp32 activations", torch.float32, True, True)):
    torch.backends.cudnn.allow_tf32 = tf32
    te, unet = modules(dtype, quanto)
    for mu in (float(x) for x in a.mu.split(",")):
        per = []
        for probe, (dirs, exact) in zip(probes, truth, strict=True):
            fd = central_differences(te, unet, probe, dirs, mu, dtype)
            per.append({"t": probe.t, "pearson": float(np.corrcoef(fd, exact)[0, 1]), "rel_err": rel_err(fd, exact)})
        r = {"config": label, "mu": mu, "step_norm": training_step(mu, table.shape[1]), "k": a.k, "probes": per,
             "pearson": min(x["pearson"] for x in per), "rel_err": max(x["rel_err"] for x in per),
             "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
             "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
        rows.append(r)
        print(json.dumps(r), flush=True)
    del te, unet
    if dev.type == "cuda":
        torch.cuda.empty_cache()
ts = " | ".join(f"t = {pr.t}" for pr in probes)
print(f"\nZO fidelity in torch ({rows[0]['device']}, torch {torch.__version__}, matmul TF32 "
      f"{torch.backends.cuda.matmul.allow_tf32}); the gate's {len(probes)} probes x {a.k} unit directions, central "
      "differences stepping mu * sqrt(d) vs fp32 autograd (CPU); the gate asks pearson >= 0.95 at the worst probe.\n")
print(f"| config | mu | step norm | pearson (worst probe) | {ts} | rel err (worst) |\n|---" + "|---" * (4 + len(probes)) + "|")
for r in rows:
    per = " | ".join(f"{x['pearson']:.4f}" for x in r["probes"])
    print(f"| {r['config']} | {r['mu']:g} | {r['step_norm']:.3g} | {r['pearson']:.4f} | {per} | {r['rel_err']:.3g} |")
