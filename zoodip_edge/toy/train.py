"""Train the toy world's text-to-image model: a small pipeline of the SD architecture.

    python -m zoodip_edge.toy.train --out zoodip_edge/toy/model                          (toy-64)
    python -m zoodip_edge.toy.train --model toy-768 --out zoodip_edge/toy/model-768      (toy-768)

(torch, CPU or a CUDA GPU with --device cuda; export extra.)

AutoencoderKL (3 levels: 32 px -> 4 x 8 x 8 latents), a CLIPTextModel with a CLIP BPE of the
world's words, a UNet2DConditionModel with cross-attention, SD1's scaled-linear DDPM schedule
and epsilon prediction. The VAE trains first, then the text encoder and U-Net together on the
VAE's latents (10% empty captions, for classifier-free guidance). Deterministic from --seed on
one machine; provenance.json records the seed, steps, losses, time and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from .world import SIZE, WORDS, WORLDS, World, caption, training_set

MAX_LEN = 24  # tokens per prompt: the longest caption is 17 with BOS/EOS; 77 would triple the cost

TEXT = dict(hidden_size=64, intermediate_size=256, num_attention_heads=4, num_hidden_layers=3,
            max_position_embeddings=MAX_LEN, hidden_act="quick_gelu", projection_dim=64)
# toy-768: CLIP-L's token width, so the learned token has CLIP-L's 768 dimensions; one layer and
# a narrow MLP keep a step cheap (the width sets the cost of every projection).
TEXT_768 = dict(TEXT, hidden_size=768, intermediate_size=256, num_attention_heads=12, num_hidden_layers=1,
                projection_dim=768)
VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
           up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64),
           layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=SIZE)
UNET = dict(sample_size=SIZE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64),
            layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
            attention_head_dim=8, norm_num_groups=16)
UNET_768 = dict(UNET, cross_attention_dim=768)
MODELS = {"toy-64": (TEXT, UNET), "toy-768": (TEXT_768, UNET_768)}  # text encoder, U-Net configs
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, steps_offset=1, prediction_type="epsilon")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train_vae(images, steps: int, batch: int, seed: int, device: str = "cpu"):
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    g = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x = x_all[torch.randint(len(x_all), (batch,), generator=g)].to(device)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / x[0].numel()
        loss = torch.nn.functional.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            _log(f"vae {step}/{steps} loss {np.mean(losses[-100:]):.4f}")
    return vae.eval(), losses


def train_diffusion(vae, images, scenes, steps: int, batch: int, seed: int, tok_dir: Path,
                    world: World, text_config: dict, unet_config: dict, device: str = "cpu"):
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=MAX_LEN)
    v = len(tokenizer)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=v, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1,
                                        **text_config)).to(device)
    unet = UNet2DConditionModel(**unet_config).to(device)
    scheduler = DDPMScheduler(**SCHEDULE)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        posts = [vae.encode(x[i:i + 512].to(device)).latent_dist for i in range(0, len(x), 512)]
        mean = torch.cat([p.mean for p in posts]).cpu()
        std = torch.cat([p.std for p in posts]).cpu()
    scale = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scale)
    _log(f"latents {tuple(mean.shape)}, scaling_factor {scale:.4f}")
    abar = scheduler.alphas_cumprod
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.03)
    g = torch.Generator().manual_seed(seed + 1)
    rng = np.random.default_rng(seed + 2)
    losses = []
    for step in range(steps):
        idx = torch.randint(len(mean), (batch,), generator=g)
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * scale
        caps = [caption(scenes[i], rng, world) if rng.random() >= 0.1 else "" for i in idx.tolist()]
        ids = tokenizer(caps, padding="max_length", max_length=MAX_LEN, truncation=True, return_tensors="pt").input_ids
        t = torch.randint(0, 1000, (batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = abar[t].view(-1, 1, 1, 1)
        zt, eps = (a.sqrt() * z0 + (1 - a).sqrt() * eps).to(device), eps.to(device)
        pred = unet(zt, t.to(device), text(ids.to(device)).last_hidden_state).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 200 == 0 or step == steps - 1:
            _log(f"diffusion {step}/{steps} loss {np.mean(losses[-200:]):.4f}")
    return text.eval().cpu(), unet.eval().cpu(), tokenizer, scheduler, losses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", choices=sorted(MODELS), default="toy-64", help="which toy model (and world) to train")
    ap.add_argument("--device", default="cpu", help="torch device: cpu or cuda (the results differ in rounding)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import diffusers
    import torch
    import transformers
    from diffusers import StableDiffusionPipeline

    from ..cpu import cpu_description
    from ..export.load import quiet_hf
    from ..export.tiny import write_clip_bpe

    quiet_hf()
    torch.set_num_threads(args.threads)
    start = time.time()
    world = WORLDS[args.model]
    text_config, unet_config = MODELS[args.model]
    images, scenes = training_set(args.images, args.seed, world)
    tok_dir = args.out / "tokenizer"
    write_clip_bpe(tok_dir, WORDS)  # named words only: an unnamed attribute has no token of its own
    vae, vae_losses = train_vae(images, args.vae_steps, 32, args.seed, args.device)
    vae_time = time.time() - start
    text, unet, tokenizer, scheduler, losses = train_diffusion(vae, images, scenes, args.steps, args.batch, args.seed,
                                                               tok_dir, world, text_config, unet_config, args.device)
    vae = vae.cpu()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(args.out)
    provenance = {
        "script": "python -m zoodip_edge.toy.train " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": args.model, "world": {"shapes": list(world.shapes), "colors": list(world.colors),
                                       "unnamed": sorted(world.unnamed)},
        "seed": args.seed, "images": args.images, "batch": args.batch, "device": args.device,
        "vae_steps": args.vae_steps, "vae_final_loss": float(np.mean(vae_losses[-100:])),
        "steps": args.steps, "final_loss": float(np.mean(losses[-500:])),
        "loss_curve": [float(np.mean(losses[i:i + 250])) for i in range(0, len(losses), 250)],
        "seconds": round(time.time() - start, 1), "vae_seconds": round(vae_time, 1),
        "threads": args.threads, "machine": cpu_description() if args.device == "cpu" else torch.cuda.get_device_name(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "diffusers": diffusers.__version__, "transformers": transformers.__version__},
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=1) + "\n")
    _log(f"saved {args.out} in {provenance['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
