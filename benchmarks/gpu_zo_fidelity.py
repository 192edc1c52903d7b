"""Does the paper's torch way keep the finite-difference signal? ZO fidelity in torch, per precision.

    python benchmarks/gpu_zo_fidelity.py PIPELINE [--device cuda] [--k 16]

The export gate's measurement (zoodip_edge/export/verify.py), done in torch instead of ORT:
central differences of the diffusion loss along k unit directions of the learned token, stepping
mu * sqrt(d) as training does (RGE's mu * e, e ~ N(0, I_d)), at mu = 1e-3 (the paper's) and 1e-2,
against fp32 autograd's directional derivatives. (Before the fifth session it stepped mu: the
results/gpu_zo_fidelity_h200_*.txt figures are on that scale.) Rows: fp32,
fp16 activations (the paper's setting), optimum-quanto int8 weights with fp16 and with fp32
activations. Prints one JSON line per row, then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from zoodip_edge.export.graphs import TextEncoderFromEmbeddings, UNetWrapper  # noqa: E402
from zoodip_edge.export.load import load_pipeline  # noqa: E402
from zoodip_edge.export.verify import make_probe, rel_err, training_step  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("pipeline")
ap.add_argument("--device", default="cuda")
ap.add_argument("--k", type=int, default=16)
ap.add_argument("--no-tf32", action="store_true", help="cuDNN convolutions in full fp32 (torch's default lets them use TF32)")
a = ap.parse_args()
if a.no_tf32:
    torch.backends.cudnn.allow_tf32 = False
dev = torch.device(a.device)
p = load_pipeline(a.pipeline)
latent = p.unet.config.sample_size
probe = make_probe(p, latent)
table = p.text_encoder.get_input_embeddings().weight.detach()
base = table[torch.from_numpy(probe.ids)].float()  # [1, 77, d]
dirs = np.random.default_rng(1).standard_normal((a.k, base.shape[-1]))
dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
zt, target = torch.from_numpy(probe.zt).to(dev), torch.from_numpy(probe.target).to(dev)


def modules(dtype: torch.dtype, quanto: bool):
    te, unet = copy.deepcopy(p.text_encoder), copy.deepcopy(p.unet)
    te.to(dev, dtype), unet.to(dev, dtype)
    if quanto:
        from optimum.quanto import freeze, qint8, quantize

        for m in (te, unet):
            quantize(m, weights=qint8)
            freeze(m)
    return TextEncoderFromEmbeddings(te).eval(), UNetWrapper(unet).eval()


def losses(te, unet, embeds: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    out = []
    with torch.no_grad():
        for e in embeds.split(8):
            b = len(e)
            pred = unet(zt.to(dtype).repeat(b, 1, 1, 1), torch.full((b,), float(probe.t), device=dev), te(e.to(dev, dtype))[0])
            out.append(((pred.float() - target) ** 2).mean(dim=(1, 2, 3)).double().cpu())
    return torch.cat(out).numpy()


# fp32 autograd: the reference directional derivatives.
te, unet = modules(torch.float32, False)
emb = base.clone().to(dev).requires_grad_(True)
loss = torch.mean((unet(zt, torch.tensor([float(probe.t)], device=dev), te(emb)[0]) - target) ** 2)
(grad,) = torch.autograd.grad(loss, emb)
exact = dirs @ grad[0, probe.row].double().cpu().numpy()
del te, unet, emb, grad
rows = []
for label, dtype, quanto in (("fp32", torch.float32, False), ("fp16 activations (paper)", torch.float16, False),
                             ("quanto int8 weights + fp16 activations (paper)", torch.float16, True),
                             ("quanto int8 weights + fp32 activations", torch.float32, True)):
    te, unet = modules(dtype, quanto)
    for mu in (1e-3, 1e-2):
        batch = base.repeat(2 * a.k, 1, 1)
        h = training_step(mu, dirs.shape[1])
        step = torch.from_numpy(h * dirs).float()
        batch[: a.k, probe.row] += step
        batch[a.k :, probe.row] -= step
        ls = losses(te, unet, batch, dtype)
        fd = (ls[: a.k] - ls[a.k :]) / (2 * h)
        r = {"config": label, "mu": mu, "step_norm": h, "k": a.k, "pearson": float(np.corrcoef(fd, exact)[0, 1]), "rel_err": rel_err(fd, exact),
             "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "torch": torch.__version__,
             "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32}
        rows.append(r)
        print(json.dumps(r), flush=True)
    del te, unet
    if dev.type == "cuda":
        torch.cuda.empty_cache()
print(f"\nZO fidelity in torch ({rows[0]['device']}, torch {torch.__version__}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}, "
      f"matmul TF32 {torch.backends.cuda.matmul.allow_tf32}); {a.k} unit directions, central differences "
      "vs fp32 autograd; the export gate asks pearson >= 0.95.\n")
print("| config | mu | pearson | rel err |\n|---|---|---|---|")
for r in rows:
    print(f"| {r['config']} | {r['mu']:g} | {r['pearson']:.4f} | {r['rel_err']:.3g} |")
