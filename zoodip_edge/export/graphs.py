"""Declarative export configs, one per graph (in the spirit of optimum's exporters).

Each ``GraphSpec`` names the torch wrapper, its input/output names, which axes are
dynamic, and how to make dummy inputs. The wrappers define the bundle's graph contract:

- text_encoder: ``inputs_embeds [B, 77, d]`` (token embeddings *before* position
  embeddings) -> ``last_hidden_state``, ``penultimate_hidden_state`` (clip-skip 2).
- unet: ``sample [B, 4, h, w]``, ``timestep [B]`` (float32), ``encoder_hidden_states``
  -> ``out_sample``.
- vae_encoder: ``image [B, 3, H, W]`` in [-1, 1] -> ``mean``, ``logvar`` (unscaled latents).
- vae_decoder: ``latent [B, 4, h, w]`` (unscaled: divide by latent_scale first) -> ``image``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .load import LoadedPipeline


class TextEncoderFromEmbeddings(torch.nn.Module):
    """CLIP text transformer that starts from token embeddings instead of input ids.

    transformers' CLIPTextModel.forward takes only input_ids, so this re-assembles
    position embeddings + causal mask + encoder layers + final layer norm.
    """

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__()
        self.model = getattr(text_encoder, "text_model", text_encoder)

    def forward(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        length = inputs_embeds.shape[1]
        h = inputs_embeds + m.embeddings.position_embedding.weight[:length]
        mask = torch.full((length, length), float("-inf"), dtype=h.dtype, device=h.device).triu(1)[None, None]
        penultimate = h
        for layer in m.encoder.layers:
            penultimate = h
            h = layer(h, mask)
        return m.final_layer_norm(h), penultimate


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class VAEEncoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        moments = self.vae.quant_conv(self.vae.encoder(image)) if self.vae.quant_conv is not None else self.vae.encoder(image)
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)


class VAEDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


@dataclass(frozen=True)
class GraphSpec:
    name: str
    wrap: Callable[[LoadedPipeline], torch.nn.Module]
    inputs: dict[str, list[int | str]]  # name -> shape; strings are dynamic axes ("batch", "height", "width")
    outputs: tuple[str, ...]
    tolerance: float  # relative-error gate vs torch fp32 for the fp32 recipe
    example: dict[str, int] = field(default_factory=dict)  # sizes of dynamic axes other than batch in dummy inputs


def graph_specs(p: LoadedPipeline, resolution: int) -> list[GraphSpec]:
    latent = resolution // vae_scale_factor(p)
    d = p.text_encoder.config.hidden_size
    length = p.tokenizer.model_max_length
    return [
        GraphSpec("text_encoder", lambda p: TextEncoderFromEmbeddings(p.text_encoder),
                  {"inputs_embeds": ["batch", length, d]}, ("last_hidden_state", "penultimate_hidden_state"), 1e-4),
        GraphSpec("unet", lambda p: UNetWrapper(p.unet),
                  {"sample": ["batch", 4, latent, latent], "timestep": ["batch"],
                   "encoder_hidden_states": ["batch", length, p.unet.config.cross_attention_dim]},
                  ("out_sample",), 1e-4),
        GraphSpec("vae_encoder", lambda p: VAEEncoderWrapper(p.vae),
                  {"image": ["batch", 3, resolution, resolution]}, ("mean", "logvar"), 1e-4),
        # Spatially dynamic so that generation can decode in tiles (memory-lean devices).
        GraphSpec("vae_decoder", lambda p: VAEDecoderWrapper(p.vae),
                  {"latent": ["batch", p.vae.config.latent_channels, "height", "width"]}, ("image",), 1e-4,
                  example={"height": latent, "width": latent}),
    ]


def vae_scale_factor(p: LoadedPipeline) -> int:
    return 2 ** (len(p.vae.config.block_out_channels) - 1)


def dummy_inputs(spec: GraphSpec, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Fixed, seeded inputs of the right scale for each graph (used for export and parity)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in spec.inputs.items():
        shape = [batch if s == "batch" else spec.example.get(s, s) for s in shape]
        if name == "timestep":
            out[name] = torch.linspace(100.0, 900.0, batch)
        elif name == "inputs_embeds":
            out[name] = 0.02 * torch.randn(shape, generator=g)
        elif name == "image":
            out[name] = torch.rand(shape, generator=g) * 2 - 1
        else:
            out[name] = torch.randn(shape, generator=g)
    return out


CALIBRATION_PROMPTS = ("a photo of a dog", "a painting of a red car on the beach", "a close-up photo of a cat on a sofa",
                       "a rendering of a house in the snow", "a watercolor of a mountain lake at dawn")


def calibration_feeds(spec: GraphSpec, p: LoadedPipeline, latent: int) -> list[dict]:
    """U-Net inputs like those it sees in training and generation: noised unit-variance latents
    at t from 50 to 950, conditioned on real prompts through the torch text encoder."""
    from ..schedule import alphas_cumprod, noisy_and_target

    if spec.name != "unet":
        raise ValueError(f"no calibration inputs for {spec.name}")
    rng = np.random.default_rng(0)
    ac = alphas_cumprod(p.scheduler_config)
    feeds = []
    for i, prompt in enumerate(CALIBRATION_PROMPTS):
        with torch.no_grad():
            cond = p.text_encoder(torch.from_numpy(p.token_ids(prompt))).last_hidden_state.numpy()
        t = int(50 + 900 * i / (len(CALIBRATION_PROMPTS) - 1))
        z = rng.standard_normal((1, int(p.unet.config.in_channels), latent, latent)).astype(np.float32)
        zt, _ = noisy_and_target(z, rng.standard_normal(z.shape).astype(np.float32), t, ac, "epsilon")
        feeds.append({"sample": zt.astype(np.float32), "timestep": np.array([t], np.float32), "encoder_hidden_states": cond})
    return feeds


def export_graph(spec: GraphSpec, p: LoadedPipeline, path: str) -> None:
    """torch.onnx.export (dynamo, opset 23) with a dynamic batch axis.

    Opset 23 emits the ONNX Attention op; ORT's CPU kernel for it materializes the score matrix
    (+534 MB for 8 heads x 4096^2), so export_bundle rewrites it into MultiHeadAttention
    (attention.py). Dummy batch is 2: torch.export specializes size-1 dimensions.
    """
    model = spec.wrap(p).eval()
    args = tuple(dummy_inputs(spec, batch=2).values())
    dims = {"batch": torch.export.Dim("batch", min=1, max=1024)}
    dyn = {}
    for name, shape in spec.inputs.items():
        for axis, s in enumerate(shape):
            if isinstance(s, str):
                dims.setdefault(s, torch.export.Dim(s, min=2, max=1024))
                dyn.setdefault(name, {})[axis] = dims[s]
    with torch.no_grad():
        torch.onnx.export(model, args, path, input_names=list(spec.inputs), output_names=list(spec.outputs),
                          opset_version=23, dynamic_shapes=dyn, dynamo=True, external_data=True, verbose=False)
