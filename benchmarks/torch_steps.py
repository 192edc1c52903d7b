"""One process: torch baselines for a personalize step on a diffusers pipeline folder (CPU, fp32).

    python benchmarks/torch_steps.py PIPELINE --mode zo|grad --steps 3 [--n 2]

- zo:   forward-only ZO step as the paper's PyTorch code does it: n + 1 text-encoder + U-Net passes
        (one batch), no gradients.
- grad: gradient textual inversion: one embedding row trainable, forward + backward + Adam, batch 1.
- quanto: the paper's way: text encoder and U-Net weights quantized to int8 with optimum-quanto
        (Linear and Conv, activations float), then the forward-only ZO step (needs `pip install optimum-quanto`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb  # noqa: E402

from zoodip_edge.export.graphs import TextEncoderFromEmbeddings  # noqa: E402
from zoodip_edge.export.load import load_pipeline  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("pipeline")
ap.add_argument("--mode", choices=["zo", "grad", "quanto"], required=True)
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--n", type=int, default=2)
a = ap.parse_args()
torch.manual_seed(0)
t0 = time.perf_counter()
p = load_pipeline(a.pipeline)
te, unet = TextEncoderFromEmbeddings(p.text_encoder).eval(), p.unet.eval()
if a.mode == "quanto":
    from optimum.quanto import freeze, qint8, quantize

    for module in (p.text_encoder, p.unet):
        quantize(module, weights=qint8)
        freeze(module)
    import gc

    gc.collect()
ids = torch.tensor([p.tokenizer("a photo of a dog", padding="max_length", max_length=77).input_ids])
table = p.text_encoder.get_input_embeddings().weight.detach()
row = int((ids[0] == p.tokenizer.eos_token_id).nonzero()[0]) - 1
h = p.unet.config.sample_size
z, eps = torch.randn(1, 4, h, h), torch.randn(1, 4, h, h)
setup_s = time.perf_counter() - t0
theta = table[ids[0, row]].clone()
opt = torch.optim.Adam([theta.requires_grad_(a.mode == "grad")], lr=5e-3) if a.mode == "grad" else None
times = []
for step in range(a.steps):
    t = time.perf_counter()
    if a.mode in ("zo", "quanto"):
        with torch.no_grad():
            thetas = theta[None] + 1e-3 * torch.cat([torch.zeros(1, theta.numel()), torch.randn(a.n, theta.numel())])
            emb = table[ids].repeat(a.n + 1, 1, 1)
            emb[:, row] = thetas
            pred = unet(z.repeat(a.n + 1, 1, 1, 1), torch.full((a.n + 1,), 700.0), te(emb)[0], return_dict=False)[0]
            losses = ((pred - eps) ** 2).mean(dim=(1, 2, 3))
    else:
        emb = table[ids].clone()
        emb[0, row] = theta
        pred = unet(z, torch.tensor([700.0]), te(emb)[0], return_dict=False)[0]
        loss = ((pred - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    times.append(time.perf_counter() - t)
print(json.dumps({"mode": a.mode, "n": a.n, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "setup_s": setup_s, "first_step_s": times[0], "s_per_step": float(np.median(times)),
                  "peak_rss_mb": peak_rss_mb()}))
