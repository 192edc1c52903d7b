"""Declarative export configs, one per graph (in the spirit of optimum's exporters).

Each ``GraphSpec`` names the torch wrapper, its input/output names, which axes are
dynamic, and how to make dummy inputs. The wrappers define the bundle's graph contract:

- text_encoder: ``inputs_embeds [B, 77, d]`` (token embeddings *before* position
  embeddings) -> ``last_hidden_state``, ``penultimate_hidden_state`` (clip-skip 2).
- unet: ``sample [B, 4, h, w]``, ``timestep [B]`` (float32), ``encoder_hidden_states``
  -> ``out_sample``.
- vae_encoder: ``image [B, 3, H, W]`` in [-1, 1] -> ``mean``, ``logvar`` (unscaled latents).
- vae_decoder: ``latent [B, 4, h, w]`` (unscaled: divide by latent_scale first) -> ``image``.

SDXL adds ``text_encoder_2``: ``inputs_embeds [B, 77, d2]``, ``eos_index [B]`` (int64) ->
``last_hidden_state``, ``penultimate_hidden_state``, ``text_embeds [B, projection]``; and its
U-Net also takes ``text_embeds [B, projection]`` and ``time_ids [B, 6]``.
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


class TextEncoderWithProjectionFromEmbeddings(TextEncoderFromEmbeddings):
    """SDXL's second text encoder (CLIPTextModelWithProjection) from token embeddings.

    Its pooled output is the final hidden state at the EOS token, projected. CLIP finds that
    position from input_ids, which a graph fed with embeddings does not have, so it is an input
    (``eos_index``): the caller knows where the EOS of each prompt is.
    """

    def __init__(self, text_encoder: torch.nn.Module):
        super().__init__(text_encoder)
        self.projection = text_encoder.text_projection

    def forward(self, inputs_embeds: torch.Tensor, eos_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        last, penultimate = super().forward(inputs_embeds)
        # gather rather than fancy indexing: one op that exports with a dynamic batch
        pooled = last.gather(1, eos_index[:, None, None].expand(-1, 1, last.shape[2]))[:, 0]
        return last, penultimate, self.projection(pooled)


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class UNetXLWrapper(UNetWrapper):
    """SDXL's U-Net, with its added conditions (``added_cond_kwargs``) as inputs."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         return_dict=False)[0]


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


def time_ids_count(p: LoadedPipeline) -> int:
    """How many ids SDXL's U-Net embeds beside the pooled text (6: original size, crop, target size)."""
    pooled = p.text_encoder_2.config.projection_dim
    return (p.unet.add_embedding.linear_1.in_features - pooled) // p.unet.config.addition_time_embed_dim


def graph_specs(p: LoadedPipeline, resolution: int) -> list[GraphSpec]:
    latent = resolution // vae_scale_factor(p)
    d = p.text_encoder.config.hidden_size
    length = p.tokenizer.model_max_length
    text = [GraphSpec("text_encoder", lambda p: TextEncoderFromEmbeddings(p.text_encoder),
                      {"inputs_embeds": ["batch", length, d]}, ("last_hidden_state", "penultimate_hidden_state"), 1e-4)]
    unet_inputs = {"sample": ["batch", 4, latent, latent], "timestep": ["batch"],
                   "encoder_hidden_states": ["batch", length, p.unet.config.cross_attention_dim]}
    unet = UNetWrapper
    if p.family == "sdxl":
        d2, pooled = p.text_encoder_2.config.hidden_size, p.text_encoder_2.config.projection_dim
        text.append(GraphSpec("text_encoder_2", lambda p: TextEncoderWithProjectionFromEmbeddings(p.text_encoder_2),
                              {"inputs_embeds": ["batch", p.tokenizer_2.model_max_length, d2], "eos_index": ["batch"]},
                              ("last_hidden_state", "penultimate_hidden_state", "text_embeds"), 1e-4))
        unet_inputs.update(text_embeds=["batch", pooled], time_ids=["batch", time_ids_count(p)])
        unet = UNetXLWrapper
    return [
        *text,
        GraphSpec("unet", lambda p: unet(p.unet), unet_inputs, ("out_sample",), 1e-4),
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
        elif name == "eos_index":  # anywhere after the first token
            out[name] = torch.randint(1, spec.inputs["inputs_embeds"][1], shape, generator=g)
        elif name == "time_ids":  # sizes and crop offsets in pixels, as SDXL's pipeline passes them
            out[name] = torch.randint(0, 1025, shape, generator=g).float()
        else:
            out[name] = torch.randn(shape, generator=g)
    return out


CALIBRATION_PROMPTS = ("a photo of a dog", "a painting of a red car on the beach", "a close-up photo of a cat on a sofa",
                       "a rendering of a house in the snow", "a watercolor of a mountain lake at dawn")


def calibration_feeds(spec: GraphSpec, p: LoadedPipeline, latent: int) -> list[dict]:
    """U-Net inputs like those it sees in training and generation: noised unit-variance latents
    at t from 50 to 950, conditioned on real prompts through the torch text encoder."""
    from ..schedule import alphas_cumprod, noisy_and_target

    if spec.name != "unet" or p.family == "sdxl":
        raise ValueError(f"no calibration inputs for {spec.name} of {p.family}")
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
    forget_last_match()


def forget_last_match() -> None:
    """Reset onnxscript's pattern matchers, which torch.onnx.export's graph optimizer runs.

    Its rewrite rules are module-level objects whose matchers keep their last match and the graph
    they last matched in, and through them the exported graph with every torch weight in it:
    after an export the torch modules could not be freed (SDXL's 10 GB U-Net stayed alive through
    quantizing; found with gc's referrers, onnxscript 0.7.2). ``_init_match`` is what the matcher
    itself calls before each match, and ``match`` sets ``_graph`` again.
    """
    import gc

    try:
        from onnxscript.rewriter._matcher import SimplePatternMatcher
    except ImportError:  # another onnxscript layout: nothing known to reset
        return
    for o in gc.get_objects():
        if isinstance(o, SimplePatternMatcher) and hasattr(o, "_init_match"):
            o._init_match(getattr(o, "_verbose", 0))
            o._graph = None
