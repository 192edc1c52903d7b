"""Load a diffusers pipeline from a folder, a hub id or a single-file checkpoint, and name its family."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import sha256_file
from ..errors import UserError


@dataclass
class LoadedPipeline:
    text_encoder: Any
    tokenizer: Any
    unet: Any
    vae: Any
    scheduler_config: dict
    family: str
    source: dict = field(default_factory=dict)
    text_encoder_2: Any = None  # SDXL: OpenCLIP bigG with its text projection
    tokenizer_2: Any = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt is zeros, not its encoding

    def token_ids(self, prompt: str) -> np.ndarray:
        """``[1, max_length]`` int64 ids of ``prompt``, padded as the text encoder expects."""
        return _ids(self.tokenizer, prompt)

    def token_ids_2(self, prompt: str) -> np.ndarray:
        """The same for SDXL's second tokenizer (which pads with its own token)."""
        return _ids(self.tokenizer_2, prompt)


def _ids(tokenizer: Any, prompt: str) -> np.ndarray:
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return np.asarray([ids], dtype=np.int64)


def quiet_hf() -> None:
    """diffusers/transformers print per-component progress bars and hints; export reports stages instead."""
    import diffusers
    import transformers

    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()


def detect_family(components: dict[str, Any]) -> str:
    """sd1 (OpenAI CLIP-L, quick_gelu) / sd2 (OpenCLIP-H, gelu) / sdxl (two text encoders)."""
    unet_cfg = components["unet"].config
    if components.get("text_encoder_2") is not None or getattr(unet_cfg, "addition_embed_type", None) == "text_time":
        return "sdxl"
    te_cfg = components["text_encoder"].config
    hidden = te_cfg.hidden_size
    if hidden == 1024 or (hidden != 768 and te_cfg.hidden_act == "gelu"):
        return "sd2"
    if hidden == 768 or te_cfg.hidden_act == "quick_gelu":
        return "sd1"
    raise UserError(f"cannot tell the model family (text encoder width {hidden}, activation {te_cfg.hidden_act})")


def _looks_like_hub_id(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/", "~"))


def model_kind(model: str) -> str:
    """"single_file", "folder" or "hub" for what ``model`` names, or UserError in one line; cheap
    (no torch), so an export refuses a wrong path before it loads anything."""
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt"):
            raise UserError(f"{model}: single-file checkpoints must be .safetensors or .ckpt")
        return "single_file"
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        return "folder"
    if os.path.lexists(path) or not _looks_like_hub_id(model):
        raise UserError(f"model not found: {model} (not a folder, a checkpoint file or a hub id)")
    return "hub"


def load_pipeline(model: str, config: str | None = None) -> LoadedPipeline:
    """Load the frozen fp32 components of a Stable Diffusion pipeline.

    ``model`` is a diffusers folder, a hub id (needs network), or a ``.safetensors`` /
    ``.ckpt`` single-file checkpoint (``config`` names a diffusers folder or hub id holding
    the matching configs, for machines without network).
    """
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline

    quiet_hf()
    path = Path(model).expanduser()
    source: dict[str, Any] = {"model": model}
    kind = model_kind(model)
    try:
        if kind == "single_file":
            source.update(kind="single_file", sha256=sha256_file(path))
            # .ckpt is a pickle: diffusers loads it with torch.load(weights_only=True), which
            # refuses arbitrary code; prefer .safetensors.
            kwargs = {"config": config} if config else {}
            pipe = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch.float32, **kwargs)
        elif kind == "folder":
            source.update(kind="folder")
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32, safety_checker=None)
        else:
            source.update(kind="hub")
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        first = first.replace(" Please check out the root cause in the stacktrace above.", "")
        raise UserError(f"could not load {model}: {first}") from None

    components = dict(pipe.components)
    for name in ("text_encoder", "tokenizer", "unet", "vae"):
        if components.get(name) is None:
            raise UserError(f"{model}: pipeline has no {name}; not a Stable Diffusion pipeline")
    family = detect_family(components)
    if family == "sdxl":
        for name in ("text_encoder_2", "tokenizer_2"):  # the refiner has only the second encoder
            if components.get(name) is None:
                raise UserError(f"{model}: SDXL pipeline without {name}; only base SDXL pipelines (two text encoders) are supported")
        if not hasattr(components["text_encoder_2"], "text_projection"):
            raise UserError(f"{model}: SDXL text_encoder_2 has no text projection (expected CLIPTextModelWithProjection)")
    source["revision"] = getattr(pipe.config, "_commit_hash", None) or components["unet"].config.get("_commit_hash")
    source["pipeline_class"] = type(pipe).__name__
    for name in ("text_encoder", "text_encoder_2", "unet", "vae"):
        if components.get(name) is not None:
            components[name].eval().requires_grad_(False).float()
    return LoadedPipeline(
        text_encoder=components["text_encoder"],
        tokenizer=components["tokenizer"],
        unet=components["unet"],
        vae=components["vae"],
        scheduler_config=dict(components["scheduler"].config),
        family=family,
        source=source,
        text_encoder_2=components.get("text_encoder_2") if family == "sdxl" else None,
        tokenizer_2=components.get("tokenizer_2") if family == "sdxl" else None,
        force_zeros_for_empty_prompt=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    )
