"""Load a diffusers pipeline from a folder, a hub id or a single-file checkpoint, and name its family."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
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

    def text_encoders(self) -> list[Any]:
        """The text encoder, and SDXL's second."""
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def modules(self) -> list[Any]:
        """The torch modules (text encoder(s), U-Net, VAE)."""
        return [*self.text_encoders(), self.unet, self.vae]

    def token_ids(self, prompt: str) -> np.ndarray:
        """``[1, max_length]`` int64 ids of ``prompt``, padded as the text encoder expects."""
        return _ids(self.tokenizer, prompt)

    def token_ids_2(self, prompt: str) -> np.ndarray:
        """The same for SDXL's second tokenizer (which pads with its own token)."""
        return _ids(self.tokenizer_2, prompt)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now; elsewhere madvise refuses it and nothing happens


def _madvise() -> Any:
    if sys.platform != "linux":  # MADV_PAGEOUT's number means something else, or nothing, elsewhere
        return None
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _madvise()


def release_weights(*modules: Any) -> None:
    """Let the OS take back the pages of these torch modules' weights until they are next read.

    diffusers maps the fp32 weight files (copy-on-write), and every page a forward has read stays in
    the process's resident memory: the SDXL torch stage read 13.9 GB of them. The pages are never
    written, so reclaiming them loses nothing: the next read brings them back from the file. Pages
    that are not file-backed (anonymous memory, without swap) are left where they are."""
    if _MADVISE is None:
        return
    page, seen = os.sysconf("SC_PAGE_SIZE"), set()
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
            start, end = -(-start // page) * page, end // page * page  # whole pages inside the storage only
            if end > start and start not in seen:
                seen.add(start)
                _MADVISE(start, end - start, MADV_PAGEOUT)


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


def _safetensors_keys(path: Path, model: str) -> list[str]:
    """The tensor names in a .safetensors header (8-byte length, then JSON), read without loading
    a weight; UserError in one line for a file that is not one."""
    bad = UserError(f"{model}: not a readable .safetensors checkpoint (corrupt or another format)")
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 2 <= size <= min(path.stat().st_size - 8, 100_000_000):
                raise bad
            header = json.loads(f.read(size))
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, IndexError, TypeError):
        raise bad from None
    if end != path.stat().st_size - 8 - size:  # the data ends where the file does: not truncated
        raise UserError(f"{model}: a corrupt .safetensors checkpoint (its data is {end} bytes, the file holds "
                        f"{path.stat().st_size - 8 - size}); truncated download?")
    return list(tensors)


def single_file_family(model: str, keys) -> str:
    """"sd" (SD1/SD2: ``cond_stage_model``) or "sdxl" (base: CLIP-L and OpenCLIP bigG as
    ``conditioner.embedders.0`` / ``.1``) from an original-layout checkpoint's tensor names, or
    UserError in one line for what the export cannot load (an SDXL refiner, a foreign file)."""
    prefixes = {k.split(".", 1)[0] for k in keys}
    if "model" not in prefixes or not any(k.startswith("model.diffusion_model.") for k in keys):
        raise UserError(f"{model}: no Stable Diffusion U-Net in it (model.diffusion_model.*); "
                        "not an SD1/SD2/SDXL single-file checkpoint")
    if not any(k.startswith(("first_stage_model.", "vae.")) for k in keys):  # the prefixes diffusers reads
        raise UserError(f"{model}: no VAE in it (first_stage_model.*); export needs a full single-file checkpoint")
    if "cond_stage_model" in prefixes:
        return "sd"
    if any(k.startswith("conditioner.embedders.1.model.") for k in keys) and \
            any(k.startswith("conditioner.embedders.0.transformer.") for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise UserError(f"{model}: an SDXL refiner checkpoint (one OpenCLIP text encoder); "
                        "only base SDXL checkpoints (two text encoders) are supported")
    raise UserError(f"{model}: text encoders neither SD (cond_stage_model.*) nor SDXL base "
                    "(conditioner.embedders.0/1.*); not a supported single-file checkpoint")


def _checkpoint_keys(path: Path, model: str) -> list[str]:
    if path.suffix == ".safetensors":
        return _safetensors_keys(path, model)
    import torch  # .ckpt: a pickle, read with weights_only (no code runs) and memory-mapped

    try:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or foreign pickle raises whatever its bytes lead to
        raise UserError(f"{model}: not a readable .ckpt checkpoint ({type(e).__name__})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{model}: not a readable .ckpt checkpoint (no state dict)")
    return [str(k) for k in state]


def check_single_file(model: str, config: str | None = None) -> str:
    """The family ("sd" or "sdxl") of a single-file checkpoint and that a local ``config`` folder
    matches it, from tensor names alone: export calls it before anything loads or is written."""
    family = single_file_family(model, _checkpoint_keys(Path(model).expanduser(), model))
    _check_config(model, config, family)
    return family


def _check_config(model: str, config: str | None, family: str) -> None:
    """A local ``config`` folder must be the pipeline class the checkpoint's keys say."""
    if not config:
        return
    index = Path(config).expanduser() / "model_index.json"
    if not Path(config).expanduser().is_dir():
        return  # a hub id: diffusers fetches it
    try:
        cls = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{config} is not a diffusers pipeline folder (no readable model_index.json)") from None
    xl = "XL" in cls
    if family == "sdxl" and not xl:
        raise UserError(f"{model} is an SDXL checkpoint but --config {config} holds a {cls or 'non-SDXL'} config; "
                        "pass an SDXL base pipeline folder")
    if family == "sd" and xl:
        raise UserError(f"{model} is an SD1/SD2 checkpoint but --config {config} holds a {cls} config; "
                        "pass an SD1/SD2 pipeline folder")


def load_pipeline(model: str, config: str | None = None) -> LoadedPipeline:
    """Load the frozen fp32 components of a Stable Diffusion pipeline.

    ``model`` is a diffusers folder, a hub id (needs network), or a ``.safetensors`` /
    ``.ckpt`` single-file checkpoint in the original layout, SD1/SD2 or SDXL base (``config``
    names a diffusers folder or hub id holding the matching configs, for machines without
    network; for SDXL, an SDXL base pipeline's).
    """
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import SafetensorError

    quiet_hf()
    path = Path(model).expanduser()
    source: dict[str, Any] = {"model": model}
    kind = model_kind(model)
    try:
        if kind == "single_file":
            source.update(kind="single_file", sha256=sha256_file(path))
            # .ckpt is a pickle: diffusers loads it with torch.load(weights_only=True), which
            # refuses arbitrary code; prefer .safetensors.
            file_family = check_single_file(model, config)
            kwargs = {"config": config} if config else {}
            cls = StableDiffusionXLPipeline if file_family == "sdxl" else StableDiffusionPipeline
            pipe = cls.from_single_file(str(path), torch_dtype=torch.float32, **kwargs)
        elif kind == "folder":
            source.update(kind="folder")
            pipe = DiffusionPipeline.from_pretrained(str(path), torch_dtype=torch.float32, safety_checker=None)
        else:
            source.update(kind="hub")
            pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    except UserError:
        raise
    except (OSError, ValueError, EnvironmentError, SafetensorError) as e:
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
