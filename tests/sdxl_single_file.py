"""Write a diffusers SDXL pipeline folder as one original-layout (Stability) checkpoint: both text
encoders under conditioner.embedders.0 / .1, the U-Net under model.diffusion_model, the VAE under
first_stage_model. The inverse of diffusers' single-file conversion, for any block and layer count
(the tiny test pipeline has two U-Net blocks of one layer), so only for tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _renamed(key: str, pairs) -> str:
    for new, old in pairs:
        key = key.replace(old, new)
    return key


_RESNET = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("emb_layers.1", "time_emb_proj"), ("skip_connection", "conv_shortcut")]
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2", "add_embedding.linear_1": "label_emb.0.0",
             "add_embedding.linear_2": "label_emb.0.2"}


def unet_to_original(sd: dict, config: dict) -> dict:
    per = config["layers_per_block"] + 1  # resnets (+ a down/upsampler slot) per block
    pairs = [("middle_block.0.", "mid_block.resnets.0."), ("middle_block.1.", "mid_block.attentions.0."),
             ("middle_block.2.", "mid_block.resnets.1.")]
    for i in range(len(config["down_block_types"])):
        for j in range(config["layers_per_block"]):
            pairs += [(f"input_blocks.{1 + i * per + j}.0.", f"down_blocks.{i}.resnets.{j}."),
                      (f"input_blocks.{1 + i * per + j}.1.", f"down_blocks.{i}.attentions.{j}.")]
        pairs.append((f"input_blocks.{(i + 1) * per}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
    for i, up_type in enumerate(config["up_block_types"]):
        for j in range(per):
            pairs += [(f"output_blocks.{i * per + j}.0.", f"up_blocks.{i}.resnets.{j}."),
                      (f"output_blocks.{i * per + j}.1.", f"up_blocks.{i}.attentions.{j}.")]
        slot = 2 if "CrossAttn" in up_type else 1
        pairs.append((f"output_blocks.{i * per + per - 1}.{slot}.", f"up_blocks.{i}.upsamplers.0."))
    out = {}
    for key, value in sd.items():
        stem, _, leaf = key.rpartition(".")
        if stem in _UNET_TOP:
            new = f"{_UNET_TOP[stem]}.{leaf}"
        else:
            new = _renamed(_renamed(key, _RESNET) if "resnets" in key else key, pairs)
        out["model.diffusion_model." + new] = value
    return out


def vae_to_original(sd: dict, config: dict) -> dict:
    n = len(config["up_block_types"])
    pairs = [("nin_shortcut", "conv_shortcut"), ("norm_out", "conv_norm_out"), ("mid.attn_1.", "mid_block.attentions.0."),
             ("mid.block_1.", "mid_block.resnets.0."), ("mid.block_2.", "mid_block.resnets.1.")]
    for i in range(n):
        pairs += [(f"down.{i}.block.", f"down_blocks.{i}.resnets."), (f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."),
                  (f"up.{n - 1 - i}.block.", f"up_blocks.{i}.resnets."), (f"up.{n - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0.")]
    attn = [("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")]
    out = {}
    for key, value in sd.items():
        new = _renamed(key, pairs)
        if "mid.attn_1." in new:
            new = _renamed(new, attn)
            if value.ndim == 2:  # the original attention is 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def clip_to_original(sd: dict) -> dict:
    """CLIP-L keeps transformers' names; newer transformers drop the ``text_model.`` level."""
    return {"conditioner.embedders.0.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in sd.items()}


def open_clip_to_original(sd: dict) -> dict:
    """OpenCLIP bigG: fused q/k/v (``in_proj``), ``resblocks``, and ``text_projection`` as width x projection."""
    pairs = [("transformer.resblocks.", "encoder.layers."), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
             ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2."), (".attn.", ".self_attn."),
             ("ln_final.", "final_layer_norm."), ("token_embedding.weight", "embeddings.token_embedding.weight"),
             ("positional_embedding", "embeddings.position_embedding.weight")]
    out, qkv = {}, {}
    for key, value in sd.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif ".self_attn." in key and key.rsplit(".", 2)[-2] in ("q_proj", "k_proj", "v_proj"):
            stem, proj, leaf = key.rsplit(".", 2)
            qkv.setdefault((stem, leaf), {})[proj] = value
        else:
            out[_renamed(key, pairs)] = value
    for (stem, leaf), parts in qkv.items():
        out[f"{_renamed(stem + '.', pairs)}in_proj_{leaf}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {"conditioner.embedders.1.model." + k: v for k, v in out.items()}


def write_original_sdxl(folder: Path, path: Path) -> Path:
    """The diffusers SDXL folder ``folder`` as one original-layout ``.safetensors`` at ``path``."""
    folder = Path(folder)

    def part(name: str) -> tuple[dict, dict]:
        weights = next((folder / name).glob("*.safetensors"))
        return load_file(str(weights)), json.loads((folder / name / "config.json").read_text())

    unet, unet_cfg = part("unet")
    vae, vae_cfg = part("vae")
    state = {**unet_to_original(unet, unet_cfg), **vae_to_original(vae, vae_cfg),
             **clip_to_original(part("text_encoder")[0]), **open_clip_to_original(part("text_encoder_2")[0])}
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path
