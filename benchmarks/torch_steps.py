"""One process: torch baselines for a personalize step on a diffusers pipeline folder (CPU or CUDA).

    python -m benchmarks.torch_steps PIPELINE --mode zo|grad|quanto --steps 3 [--n 2]
                                     [--device cpu|cuda] [--dtype fp32|fp16] [--warmup K]

- zo:   forward-only ZO step as the paper's PyTorch code does it: n + 1 text-encoder + U-Net passes
        (one batch), no gradients.
- grad: gradient textual inversion: one embedding row trainable, forward + backward + Adam, batch 1
        (fp32 only).
- quanto: the paper's way: text encoder and U-Net weights quantized to int8 with optimum-quanto
        (Linear and Conv, activations float: fp32, or fp16 with --dtype fp16), then the forward-only
        ZO step (needs `pip install optimum-quanto`). int8 weights with float activations run
        quanto's pure-torch path (dequantize, then matmul/conv) on CPU and CUDA alike: its CUDA
        extension (JIT-compiled on first use) serves only int4/AWQ/Marlin kernels.

An SDXL pipeline (``--mode zo`` only) runs both text encoders on the token's two rows, learned as
one vector as ``personalize`` learns it, and the U-Net with its added conditions (the pooled text
and the uncropped square's time ids at the pipeline's resolution).

Timing: ``first_step_s`` is the very first step; ``s_per_step`` is the median of the ``--steps``
steps after ``--warmup`` untimed-in-the-median steps (default 0 on CPU, so the median includes
the first step as it always has; 1 on CUDA). On CUDA every timing read follows
torch.cuda.synchronize(). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import numpy as np
import torch

from benchmarks.common import nvml_used_mb, peak_rss_mb
from zoodip_edge.export.graphs import TextEncoderFromEmbeddings, TextEncoderWithProjectionFromEmbeddings
from zoodip_edge.export.load import load_pipeline

ap = argparse.ArgumentParser()
ap.add_argument("pipeline")
ap.add_argument("--mode", choices=["zo", "grad", "quanto"], required=True)
ap.add_argument("--steps", type=int, default=3, help="steps in the median (after --warmup)")
ap.add_argument("--n", type=int, default=2)
ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ap.add_argument("--dtype", choices=["fp32", "fp16"], default="fp32",
                help="weights and activations (fp16: CUDA only; the paper's ZO setting)")
ap.add_argument("--resolution", type=int, help="image size in pixels (default: the U-Net's sample size x 8)")
ap.add_argument("--warmup", type=int, default=None, help="steps run before the timed ones (default: 0 cpu, 1 cuda)")
a = ap.parse_args()
if a.dtype == "fp16" and a.device != "cuda":
    ap.error("--dtype fp16 is for --device cuda (CPU fp16 kernels are not what any baseline runs)")
if a.dtype == "fp16" and a.mode == "grad":
    ap.error("--mode grad runs in fp32 only (fp16 gradient TI would need loss scaling; not a baseline here)")
if a.device == "cuda" and not torch.cuda.is_available():
    ap.error("--device cuda but torch.cuda.is_available() is False")
if a.steps < 1:
    ap.error("--steps must be at least 1")
warmup = a.warmup if a.warmup is not None else (1 if a.device == "cuda" else 0)
dev = torch.device(a.device)
dt = torch.float16 if a.dtype == "fp16" else torch.float32
cuda = dev.type == "cuda"
MB = 2**20


def sync() -> None:
    if cuda:
        torch.cuda.synchronize()


torch.manual_seed(0)
t0 = time.perf_counter()
p = load_pipeline(a.pipeline)
if cuda or dt != torch.float32:
    # The VAE stays on the CPU: a personalize step with cached latents never runs it.
    p.text_encoder.to(device=dev, dtype=dt)
    p.unet.to(device=dev, dtype=dt)
te, unet = TextEncoderFromEmbeddings(p.text_encoder).eval(), p.unet.eval()
sdxl = p.family == "sdxl"
if sdxl and (a.mode != "zo" or cuda or dt != torch.float32):
    ap.error("an SDXL pipeline runs --mode zo in fp32 on the CPU only")
extra: dict = {}
if a.mode == "quanto":
    from optimum.quanto import freeze, qint8, quantize

    for module in (p.text_encoder, p.unet):
        quantize(module, weights=qint8)
        freeze(module)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
ids = torch.tensor([p.tokenizer("a photo of a dog", padding="max_length", max_length=77).input_ids])
table = p.text_encoder.get_input_embeddings().weight.detach()
row = int((ids[0] == p.tokenizer.eos_token_id).nonzero()[0]) - 1
ids = ids.to(dev)
if sdxl:  # the second encoder's ids, row and pooling position, and its table beside the first
    from zoodip_edge.export.verify_sdxl import default_time_ids, eos_index, pooled_rule

    te2 = TextEncoderWithProjectionFromEmbeddings(p.text_encoder_2).eval()
    ids2 = torch.from_numpy(p.token_ids_2("a photo of a dog"))
    eos2 = torch.from_numpy(eos_index(ids2.numpy(), pooled_rule(p), p.text_encoder_2.config.eos_token_id))
    table2 = p.text_encoder_2.get_input_embeddings().weight.detach()
h = a.resolution // 8 if a.resolution else p.unet.config.sample_size
if sdxl:
    time_ids = torch.from_numpy(default_time_ids(8 * h, 6, a.n + 1))
z, eps = torch.randn(1, 4, h, h), torch.randn(1, 4, h, h)  # drawn on the CPU: same values on either device
z, eps = z.to(dev, dt), eps.to(dev, dt)
timestep = torch.full((a.n + 1,), 700.0, device=dev) if a.mode in ("zo", "quanto") else torch.tensor([700.0], device=dev)
sync()
setup_s = time.perf_counter() - t0
if cuda:
    extra["setup_peak_cuda_allocated_mb"] = torch.cuda.max_memory_allocated(dev) / MB
    extra["weights_cuda_allocated_mb"] = torch.cuda.memory_allocated(dev) / MB
    torch.cuda.reset_peak_memory_stats(dev)
theta = table[ids[0, row]].clone() if not sdxl else torch.cat([table[ids[0, row]], table2[ids2[0, row]]])
opt = torch.optim.Adam([theta.requires_grad_(a.mode == "grad")], lr=5e-3) if a.mode == "grad" else None
times, finite = [], True
for step in range(warmup + a.steps):
    sync()
    t = time.perf_counter()
    if a.mode in ("zo", "quanto"):
        with torch.no_grad():
            noise = torch.randn(a.n, theta.numel()).to(dev, dt)
            thetas = theta[None] + 1e-3 * torch.cat([torch.zeros_like(noise[:1]), noise])
            emb = table[ids].repeat(a.n + 1, 1, 1)
            emb[:, row] = thetas[:, :table.shape[1]]
            if sdxl:
                emb2 = table2[ids2].repeat(a.n + 1, 1, 1)
                emb2[:, row] = thetas[:, table.shape[1]:]
                _, c2, pooled = te2(emb2, eos2.repeat(a.n + 1))
                pred = unet(z.repeat(a.n + 1, 1, 1, 1), timestep, torch.cat([te(emb)[1], c2], dim=-1),
                            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}, return_dict=False)[0]
            else:
                pred = unet(z.repeat(a.n + 1, 1, 1, 1), timestep, te(emb)[0], return_dict=False)[0]
            losses = ((pred.float() - eps.float()) ** 2).mean(dim=(1, 2, 3))
    else:
        emb = table[ids].clone()
        emb[0, row] = theta
        pred = unet(z, timestep, te(emb)[0], return_dict=False)[0]
        loss = ((pred - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses = loss.detach()[None]
    sync()
    times.append(time.perf_counter() - t)
    finite = finite and bool(torch.isfinite(losses).all())
result = {"mode": a.mode, "n": a.n, "device": a.device, "dtype": a.dtype, "torch": torch.__version__,
          "threads": torch.get_num_threads(), "steps": a.steps, "warmup": warmup,
          "setup_s": setup_s, "first_step_s": times[0], "s_per_step": float(np.median(times[warmup:])),
          "step_times_s": [round(x, 5) for x in times], "losses_finite": finite, "peak_rss_mb": peak_rss_mb()}
if cuda:
    used, source = nvml_used_mb(torch.cuda.current_device(), str(getattr(torch.cuda.get_device_properties(dev), "uuid", "") or ""))
    result.update(device_name=torch.cuda.get_device_name(dev), cuda=torch.version.cuda,
                  peak_cuda_allocated_mb=torch.cuda.max_memory_allocated(dev) / MB,
                  peak_cuda_reserved_mb=torch.cuda.max_memory_reserved(dev) / MB,
                  nvml_used_mb=used, nvml_source=source,
                  tf32_matmul=torch.backends.cuda.matmul.allow_tf32, tf32_cudnn=torch.backends.cudnn.allow_tf32,
                  cudnn_benchmark=torch.backends.cudnn.benchmark, **extra)
if a.mode == "quanto":
    from optimum.quanto.library.extensions import get_extension, is_extension_available

    ext = get_extension("quanto_cuda") if is_extension_available("quanto_cuda") else None
    result["quanto_cuda_extension"] = ("not registered" if ext is None else
                                       "compiled and loaded" if ext._lib is not None else "registered, never compiled")
print(json.dumps(result))
