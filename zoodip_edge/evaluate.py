"""The paper's personalization metrics: CLIP-I, CLIP-T and DINO (DreamBooth protocol).

Protocol (docs/algorithm.md, "Evaluation protocol"; DreamBooth, Ruiz et al. 2023):

* CLIP-I: mean cosine similarity between the CLIP image embeddings of *every* generated image
  and *every* real reference image of the subject (all pairs, not a diagonal).
* CLIP-T: mean cosine similarity between each generated image's CLIP image embedding and the
  CLIP text embedding of the prompt that generated it. The text side uses the prompt with the
  learned token replaced by the class noun: ``"a sks dog in the jungle"`` (DreamBooth style,
  token followed by the class noun) becomes ``"a dog in the jungle"``, and ``"a photo of sks"``
  (textual-inversion style, the token stands for the noun) becomes ``"a photo of dog"``. The
  text encoder has never seen the learned token, so it is scored on what the prompt asks for.
* DINO: mean pairwise cosine similarity of DINOv2 [CLS] embeddings (last_hidden_state[:, 0]),
  generated vs reference, all pairs.

Defaults are the paper's models, ``openai/clip-vit-base-patch32`` and
``facebook/dinov2-base``; either may be a hub id (needs network or a filled cache) or a local
folder saved with ``save_pretrained``. The metric functions are plain NumPy on features; torch
and transformers are imported only when a scorer is built, so importing this module stays light.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .errors import UserError
from .files import write_atomic

DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dinov2-base"


# ---------------------------------------------------------------- metric math (NumPy only)

def _as_2d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise UserError(f"{name}: expected a non-empty (n, dim) feature array, got shape {np.shape(x)}")
    if not np.all(np.isfinite(a)):
        raise UserError(f"{name}: features contain NaN or infinity")
    return a


def _normalize(a: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.maximum(norms, 1e-12)


def cosine_matrix(a: Any, b: Any) -> np.ndarray:
    """(n, m) cosine similarities between the rows of ``a`` (n, d) and ``b`` (m, d)."""
    a2, b2 = _as_2d(a, "a"), _as_2d(b, "b")
    if a2.shape[1] != b2.shape[1]:
        raise UserError(f"feature widths differ: {a2.shape[1]} vs {b2.shape[1]}")
    return _normalize(a2) @ _normalize(b2).T


def clip_i(gen_feats: Any, ref_feats: Any) -> float:
    """CLIP-I: mean cosine over all (generated, reference) pairs of CLIP image embeddings."""
    return float(cosine_matrix(gen_feats, ref_feats).mean())


def clip_t(gen_img_feats: Any, text_feats_per_image: Any) -> float:
    """CLIP-T: mean cosine between each generated image and its own prompt's text embedding.

    ``text_feats_per_image`` has one row per generated image (row i = the prompt of image i;
    a single row is used for every image). The prompt must already have its learned token
    replaced by the class noun (see :func:`text_prompt`).
    """
    img = _normalize(_as_2d(gen_img_feats, "gen_img_feats"))
    txt = _normalize(_as_2d(text_feats_per_image, "text_feats_per_image"))
    if txt.shape[1] != img.shape[1]:
        raise UserError(f"feature widths differ: {img.shape[1]} vs {txt.shape[1]}")
    if txt.shape[0] == 1:
        txt = np.repeat(txt, img.shape[0], axis=0)
    if txt.shape[0] != img.shape[0]:
        raise UserError(f"CLIP-T needs one text embedding per image: {img.shape[0]} images, {txt.shape[0]} texts")
    return float(np.sum(img * txt, axis=1).mean())


def dino(gen_feats: Any, ref_feats: Any) -> float:
    """DINO: mean cosine over all (generated, reference) pairs of DINO [CLS] embeddings."""
    return float(cosine_matrix(gen_feats, ref_feats).mean())


_dino_metric = dino  # evaluate_images has a parameter named ``dino``


def text_prompt(prompt: str, token: str, class_word: str) -> str:
    """The prompt CLIP-T scores against: the learned token replaced by the class noun.

    ``"<token> <class>"`` collapses to ``"<class>"`` (DreamBooth prompts name both); a lone
    ``<token>`` becomes ``<class>`` (textual-inversion prompts). Whitespace is tidied.
    """
    if not token:
        return " ".join(prompt.split())
    tok = re.escape(token)
    # The token as a whole word (token strings like "<sks>" have no word characters at the ends).
    word = rf"(?<![\w<]){tok}(?![\w>])"
    if class_word:
        text = re.sub(rf"{word}\s+{re.escape(class_word)}(?!\w)", class_word, prompt)
        text = re.sub(word, class_word, text)
    else:
        text = re.sub(word, "", prompt)
    return " ".join(text.split())


# ---------------------------------------------------------------- model wrappers (lazy torch)

def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _looks_like_path(model: str) -> bool:
    if model.startswith((".", "/", "~", "\\")) or Path(model).expanduser().exists():
        return True
    parts = model.split("/")
    return not (len(parts) == 2 and all(parts))


def _load_error(what: str, model: str, err: BaseException) -> UserError:
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(detail) > 200:
        detail = detail[:197] + "..."
    return UserError(
        f"cannot load the {what} model {model!r} ({type(err).__name__}: {detail}); "
        f"without network, pass a local folder saved with save_pretrained"
    )


def check_model_source(what: str, model: str, timeout: float = 3.0) -> None:
    """Refuse in one line, before any work, a model that cannot be loaded: a folder that does not
    exist, or a hub id neither in the local cache nor reachable (one quick connection attempt
    instead of the hub client's retries)."""
    if _looks_like_path(model):
        if not Path(model).expanduser().is_dir():
            raise UserError(f"cannot load the {what} model {model!r}: no such folder; "
                            f"pass a local folder saved with save_pretrained (or a hub id where there is network)")
        return
    import os
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise UserError(f"cannot load the {what} model {model!r}: it is not in the local cache and HF_HUB_OFFLINE is set; "
                        f"pass a local folder saved with save_pretrained")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)),
                                 timeout=timeout).close()
    except OSError:
        raise UserError(f"cannot load the {what} model {model!r}: it is not in the local cache and the model hub "
                        f"({endpoint.hostname}) cannot be reached; pass a local folder saved with save_pretrained") from None


def _pick_device(device: str | None) -> str:
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _rgb(images: Iterable[Any]) -> list:
    out = []
    for im in images:
        if not hasattr(im, "convert"):
            raise UserError(f"expected PIL images, got {type(im).__name__}")
        out.append(im.convert("RGB") if im.mode != "RGB" else im)
    return out


def _features(out: Any) -> Any:
    """transformers v4 returns a tensor from get_*_features, v5 an output whose pooler is projected."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = out[0] if isinstance(out, (tuple, list)) else out["pooler_output"]
    return pooled


def _l2(t: Any) -> np.ndarray:
    a = t.detach().float().cpu().numpy().astype(np.float64)
    return _normalize(a)


class ClipScorer:
    """CLIP image and text embeddings (L2-normalized) for CLIP-I and CLIP-T."""

    def __init__(self, model: str = DEFAULT_CLIP, device: str | None = None, batch_size: int = 16):
        check_model_source("CLIP", model)
        self.name = str(model)
        self.batch_size = max(1, int(batch_size))
        try:
            _quiet_transformers()
            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            self.model = CLIPModel.from_pretrained(model)
            self.image_processor = AutoImageProcessor.from_pretrained(model)
            self.tokenizer = AutoTokenizer.from_pretrained(model)
        except UserError:
            raise
        except Exception as err:  # OSError (no network / missing files), ValueError, ...
            raise _load_error("CLIP", model, err) from err
        self.device = _pick_device(device)
        self.model.eval().to(self.device)
        cfg = getattr(self.model.config, "text_config", None)
        self.max_length = int(getattr(cfg, "max_position_embeddings", 77) or 77)

    def image_features(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        images = _rgb(images)
        feats = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                px = self.image_processor(images=images[i:i + self.batch_size], return_tensors="pt")["pixel_values"]
                feats.append(_l2(_features(self.model.get_image_features(pixel_values=px.to(self.device)))))
        return np.concatenate(feats) if feats else np.zeros((0, 0))

    def text_features(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        texts = list(texts)
        feats = []
        with torch.inference_mode():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
                feats.append(_l2(_features(self.model.get_text_features(**enc))))
        return np.concatenate(feats) if feats else np.zeros((0, 0))


class DinoScorer:
    """DINOv2 [CLS] embeddings (last_hidden_state[:, 0], L2-normalized) for the DINO metric."""

    def __init__(self, model: str = DEFAULT_DINO, device: str | None = None, batch_size: int = 16):
        check_model_source("DINO", model)
        self.name = str(model)
        self.batch_size = max(1, int(batch_size))
        try:
            _quiet_transformers()
            from transformers import AutoImageProcessor, AutoModel

            self.model = AutoModel.from_pretrained(model)
            self.image_processor = AutoImageProcessor.from_pretrained(model)
        except UserError:
            raise
        except Exception as err:
            raise _load_error("DINO", model, err) from err
        self.device = _pick_device(device)
        self.model.eval().to(self.device)

    def image_features(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        images = _rgb(images)
        feats = []
        with torch.inference_mode():
            for i in range(0, len(images), self.batch_size):
                px = self.image_processor(images=images[i:i + self.batch_size], return_tensors="pt")["pixel_values"]
                out = self.model(pixel_values=px.to(self.device))
                feats.append(_l2(out.last_hidden_state[:, 0]))
        return np.concatenate(feats) if feats else np.zeros((0, 0))


# ---------------------------------------------------------------- evaluation + report

def load_image_folder(folder: str | Path) -> list:
    """All images in ``folder`` (sorted by name), as RGB PIL images: personalize's loader, so a
    file it refuses (empty, truncated, too large, not a regular file) is refused here in one line."""
    from .runtime.images import load_rgb_images

    if not Path(folder).is_dir():
        raise UserError(f"image folder not found: {folder}")
    return [im for _, im in load_rgb_images(folder)]


def evaluate_images(
    generated: dict[str, list],
    references: list,
    class_word: str,
    token: str,
    clip: str | ClipScorer = DEFAULT_CLIP,
    dino: str | DinoScorer = DEFAULT_DINO,
    device: str | None = None,
) -> dict:
    """CLIP-I, CLIP-T and DINO of ``generated`` (prompt -> PIL images) against ``references``.

    Overall scores pool every generated image (all prompts) against every reference image;
    ``per_prompt`` holds the same metrics per prompt. ``clip``/``dino`` are model ids or
    folders, or already built scorers (to reuse a loaded model across subjects).
    """
    gen = {str(p): list(ims) for p, ims in generated.items() if len(ims)}
    if not gen:
        raise UserError("no generated images to evaluate")
    refs = list(references)
    if not refs:
        raise UserError("no reference images to evaluate against")
    clip_scorer = clip if isinstance(clip, ClipScorer) else ClipScorer(clip, device=device)
    dino_scorer = dino if isinstance(dino, DinoScorer) else DinoScorer(dino, device=device)

    prompts = list(gen)
    images = [im for p in prompts for im in gen[p]]
    owner = [p for p in prompts for _ in gen[p]]
    texts = {p: text_prompt(p, token, class_word) for p in prompts}

    ref_clip = clip_scorer.image_features(refs)
    ref_dino = dino_scorer.image_features(refs)
    gen_clip = clip_scorer.image_features(images)
    gen_dino = dino_scorer.image_features(images)
    text_feat = dict(zip(prompts, clip_scorer.text_features([texts[p] for p in prompts])))
    gen_text = np.stack([text_feat[p] for p in owner])

    per_prompt = {}
    start = 0
    for p in prompts:
        sl = slice(start, start + len(gen[p]))
        start = sl.stop
        per_prompt[p] = {
            "text": texts[p],
            "num_images": sl.stop - sl.start,
            "clip_i": clip_i(gen_clip[sl], ref_clip),
            "clip_t": clip_t(gen_clip[sl], gen_text[sl]),
            "dino": _dino_metric(gen_dino[sl], ref_dino),
        }
    return {
        "clip_i": clip_i(gen_clip, ref_clip),
        "clip_t": clip_t(gen_clip, gen_text),
        "dino": _dino_metric(gen_dino, ref_dino),
        "num_prompts": len(prompts),
        "num_generated": len(images),
        "num_references": len(refs),
        "class_word": class_word,
        "token": token,
        "clip_model": clip_scorer.name,
        "dino_model": dino_scorer.name,
        "per_prompt": per_prompt,
    }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v).replace("|", "\\|")


def write_report(results: dict, json_path: str | Path | None, md_path: str | Path | None) -> None:
    """Write ``results`` (from :func:`evaluate_images`) as JSON and as a markdown table."""
    if json_path is not None:
        jp = Path(json_path)
        jp.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(jp, (json.dumps(results, indent=2, ensure_ascii=False) + "\n").encode())
    if md_path is None:
        return
    lines = ["# Personalization metrics", ""]
    lines += ["| Metric | Value |", "| --- | --- |"]
    for key, label in (("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("dino", "DINO")):
        if key in results:
            lines.append(f"| {label} | {_fmt(results[key])} |")
    for key, label in (("num_prompts", "prompts"), ("num_generated", "generated images"),
                       ("num_references", "reference images"), ("class_word", "class noun"),
                       ("token", "token"), ("clip_model", "CLIP model"), ("dino_model", "DINO model")):
        if key in results:
            lines.append(f"| {label} | {_fmt(results[key])} |")
    per = results.get("per_prompt") or {}
    if per:
        lines += ["", "## Per prompt", "", "| Prompt | Images | CLIP-I | CLIP-T | DINO |",
                  "| --- | --- | --- | --- | --- |"]
        for prompt, r in per.items():
            lines.append(f"| {_fmt(prompt)} | {r.get('num_images', '')} | {_fmt(r.get('clip_i', ''))} | "
                         f"{_fmt(r.get('clip_t', ''))} | {_fmt(r.get('dino', ''))} |")
    lines.append("")
    mp = Path(md_path)
    mp.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(mp, "\n".join(lines).encode())
