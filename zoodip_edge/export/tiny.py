"""Tiny SD1-, SD2- and SDXL-like diffusers pipelines built from configs with random weights.

No machine of this project reaches a model hub, so tests, the README quick start and
benchmarks build pipelines of the real architecture here. Weights are random: they prove
the plumbing (shapes, parity, hashes), not that a concept can be learned.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = (
    "a an the of in on with photo picture rendering painting cropped close up good bad "
    "clean dirty dark bright small large big cool nice weird one two my dog cat toy "
    "sneaker car red blue green yellow white black background style art sks beach"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet (printable bytes map to themselves).
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _apply_bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        a, b = min(pairs, key=ranks.get)
        out, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
                out.append(a + b)
                i += 2
            else:
                out.append(symbols[i])
                i += 1
        symbols = out
    return symbols


def write_clip_bpe(folder: Path, words: tuple[str, ...] = tuple(WORDS), vocab_size: int | None = None) -> int:
    """Write vocab.json + merges.txt of a small CLIP-style BPE; returns the vocab size.

    ``vocab_size`` pads the vocabulary with unreachable filler entries, so a random model
    can have the real CLIP table shape (49408 rows) without the real BPE files.
    """
    base = list(_bytes_to_unicode().values())
    vocab = base + [c + "</w>" for c in base]
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Apply the merges so far the way CLIP's BPE does (lowest rank first), then add merges
        # for what is left, at the lowest priority: earlier words, which already end as one
        # token, never reach them, so every word stays a single token.
        symbols = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks.setdefault(pair, len(ranks))
            if pair[0] + pair[1] not in vocab:
                vocab.append(pair[0] + pair[1])
            symbols = [pair[0] + pair[1]] + symbols[2:]
    merges = sorted(ranks, key=ranks.get)
    if vocab_size is not None:
        vocab += [f"<|filler-{i}|>" for i in range(vocab_size - 2 - len(vocab))]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return len(vocab)


# The published SD1.5 configs (runwayml/stable-diffusion-v1-5), for benchmarks: weights change
# neither memory nor speed, so random ones measure what the real model costs.
SD15 = {
    "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768),
    "unet": dict(sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
                 layers_per_block=2, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
    "vae": dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512),
}


def build_sd15_architecture(out: Path, seed: int = 0) -> Path:
    """Save an SD1.5-architecture pipeline with random weights (about 4 GB) to ``out``."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .load import quiet_hf

    quiet_hf()
    torch.manual_seed(seed)
    out = Path(out)
    tok_dir = out / "tokenizer"
    vocab = write_clip_bpe(tok_dir, vocab_size=SD15["text"]["vocab_size"])
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    text = CLIPTextModel(CLIPTextConfig(**SD15["text"], bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**SD15["vae"]), text_encoder=text, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**SD15["unet"]),
        scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


# The published SDXL base configs (stabilityai/stable-diffusion-xl-base-1.0), for the same purpose.
SDXL = {
    "text": SD15["text"],
    "text_2": dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                   num_hidden_layers=32, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280),
    "unet": dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                 layers_per_block=2, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), norm_num_groups=32,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), use_linear_projection=True, addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816),
    "vae": {**SD15["vae"], "sample_size": 1024, "scaling_factor": 0.13025},
}


def build_sdxl_architecture(out: Path, seed: int = 0) -> Path:
    """Save an SDXL-base-architecture pipeline with random weights (about 14 GB in fp32) to ``out``.

    Each component is saved and freed before the next is built, so building needs about the
    U-Net's 10 GB, not the pipeline's 14 GB.
    """
    import gc

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .load import quiet_hf

    quiet_hf()
    torch.manual_seed(seed)
    out = Path(out)
    vocab = write_clip_bpe(out / "tokenizer", vocab_size=SDXL["text"]["vocab_size"])
    write_clip_bpe(out / "tokenizer_2", vocab_size=SDXL["text_2"]["vocab_size"])
    CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"),
                  model_max_length=77).save_pretrained(out / "tokenizer")
    CLIPTokenizer(str(out / "tokenizer_2" / "vocab.json"), str(out / "tokenizer_2" / "merges.txt"),
                  model_max_length=77, pad_token="!").save_pretrained(out / "tokenizer_2")
    ids = dict(bos_token_id=vocab - 2, pad_token_id=vocab - 1)
    parts = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**SDXL["text"], eos_token_id=vocab - 1, **ids)),
        # eos_token_id 2, as published: the pooled output is taken at the highest token id
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**SDXL["text_2"], eos_token_id=2, **ids)),
        "vae": lambda: AutoencoderKL(**SDXL["vae"]),
        "unet": lambda: UNet2DConditionModel(**SDXL["unet"]),
        "scheduler": lambda: EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                    beta_schedule="scaled_linear", steps_offset=1,
                                                    timestep_spacing="leading", prediction_type="epsilon"),
    }
    library = {"text_encoder": "transformers", "text_encoder_2": "transformers"}
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"]}
    for name, make in parts.items():
        module = make()
        module.save_pretrained(out / name)
        index[name] = [library.get(name, "diffusers"), type(module).__name__]
        del module
        gc.collect()
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out


def build_tiny_pipeline(out: Path, family: str = "sd1", seed: int = 0, resolution: int = 64) -> Path:
    """Save a tiny random-weight StableDiffusionPipeline of the given family to ``out``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    if family not in ("sd1", "sd2"):
        raise ValueError(f"tiny pipelines exist for sd1 and sd2, not {family!r}")
    sd2 = family == "sd2"
    from .load import quiet_hf

    quiet_hf()
    torch.manual_seed(seed)
    out = Path(out)
    tok_dir = out / "tokenizer"
    vocab_size = write_clip_bpe(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)
    hidden = 64 if sd2 else 32
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=77,
            # SD1 uses OpenAI CLIP-L (quick_gelu), SD2 OpenCLIP-H (gelu): family detection reads this.
            hidden_act="gelu" if sd2 else "quick_gelu",
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=vocab_size - 1,
            projection_dim=hidden,
        )
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),  # 4 blocks: the real SD downsampling factor 8
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
    ).eval()
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=hidden,
        attention_head_dim=(4, 8) if sd2 else 8,
        use_linear_projection=sd2,
        norm_num_groups=16,
    ).eval()
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def build_tiny_sdxl_pipeline(out: Path, seed: int = 0, resolution: int = 64) -> Path:
    """Save a tiny random-weight StableDiffusionXLPipeline to ``out``.

    The published SDXL layout in miniature: CLIP-L-like ``text_encoder`` (quick_gelu) and
    OpenCLIP-bigG-like ``text_encoder_2`` (gelu, with a text projection; its config says
    ``eos_token_id`` 2 as the published one does, so its pooled output is taken at the highest
    token id), ``tokenizer_2`` padding with "!", a U-Net with SDXL's added conditions
    (``text_time``: pooled text embedding + six size/crop ids) whose cross-attention width is
    the two encoders' widths together, a VAE with SDXL's scaling factor and an Euler scheduler.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from .load import quiet_hf

    quiet_hf()
    torch.manual_seed(seed)
    out = Path(out)
    vocab_size = write_clip_bpe(out / "tokenizer")
    write_clip_bpe(out / "tokenizer_2")
    tokenizer = CLIPTokenizer(str(out / "tokenizer" / "vocab.json"), str(out / "tokenizer" / "merges.txt"), model_max_length=77)
    tokenizer_2 = CLIPTokenizer(str(out / "tokenizer_2" / "vocab.json"), str(out / "tokenizer_2" / "merges.txt"),
                                model_max_length=77, pad_token="!")
    widths, projection, time_embed = (32, 64), 32, 8

    def clip(hidden: int, act: str, eos: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=4,
                              num_hidden_layers=3, max_position_embeddings=77, hidden_act=act, bos_token_id=vocab_size - 2,
                              eos_token_id=eos, pad_token_id=vocab_size - 1, projection_dim=projection)

    text_encoder = CLIPTextModel(clip(widths[0], "quick_gelu", vocab_size - 1)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(clip(widths[1], "gelu", 2)).eval()
    unet = UNet2DConditionModel(
        sample_size=resolution // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=sum(widths),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        projection_class_embeddings_input_dim=6 * time_embed + projection,
        norm_num_groups=16,
    ).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=resolution, scaling_factor=0.13025).eval()
    scheduler = EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                       beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                                       prediction_type="epsilon")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                                     tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True)
    pipe.save_pretrained(out)
    return out
