"""Text-to-image on the device: the bundle's text encoder(s), U-Net and VAE decoder through ORT,
classifier-free guidance and a NumPy sampler. No torch. SDXL bundles add the second text
encoder and the U-Net's added conditions (pooled text, size and crop ids).

    g = Generator("bundle/", embeddings=["my-dog.safetensors"])
    images = g.generate("a photo of <my-dog> on a beach", n=2, seed=0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from ..bundle import Bundle, load_bundle
from ..errors import UserError
from .checks import check_seed
from .schedulers import make_sampler
from .sessions import BundleSessions
from .text import PromptEncoder, XLPromptEncoder, bundle_prompt_encoder

Warn = Callable[[str], None]


def load_embeddings(paths: Iterable[str | Path], family: str = "sd1") -> list[tuple[str, np.ndarray | dict]]:
    """(token, vectors) for each file: ours, diffusers', or A1111's (the file name is the token).
    For an ``sdxl`` bundle the vectors are ``{"clip_l": [k, d1], "clip_g": [k, d2]}`` and a
    one-encoder (SD1/SD2) file is refused; for the others ``[k, d]`` and an SDXL file is refused."""
    from ..embeddings import load_embedding

    out = []
    for path in paths:
        token, vec, _ = load_embedding(path)
        if isinstance(vec, dict) and family != "sdxl":
            raise UserError(f"{path} is an SDXL embedding (clip_l and clip_g); this {family} bundle takes one text encoder's")
        if not isinstance(vec, dict) and family == "sdxl":
            raise UserError(f"{path} is an SD1/SD2 embedding (one text encoder); this SDXL bundle needs clip_l and clip_g")
        out.append((token or Path(path).stem, vec))
    return out


#: Most images one call generates: they are sampled as one batch.
MAX_IMAGES = 256
#: Guidance beyond this only amplifies numerical noise (useful scales are 1 to about 20).
MAX_GUIDANCE = 100.0
#: Smallest decoding tile, in latent pixels.
MIN_TILE = 4


def check_generation(*, n: int, steps: int, guidance: float, seed: int, train_steps: int = 1000,
                     tile: int | None = None) -> None:
    """Refuse, in one line, numbers no generation can use (before any model work)."""
    if tile is not None and tile < MIN_TILE:
        raise UserError(f"--tile must be at least {MIN_TILE} latent pixels")
    if not 1 <= n <= MAX_IMAGES:
        raise UserError(f"the number of images must be between 1 and {MAX_IMAGES}, got {n}")
    if not 1 <= steps <= train_steps:
        raise UserError(f"sampling steps must be between 1 and {train_steps} (the model's timesteps), got {steps}")
    if not 0 <= guidance <= MAX_GUIDANCE:  # NaN fails too
        raise UserError(f"the guidance scale must be a number from 0 to {MAX_GUIDANCE:g}, got {guidance}")
    check_seed(seed)


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> PIL RGB images."""
    arr = np.clip((images.transpose(0, 2, 3, 1) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return [Image.fromarray(a) for a in arr]


def grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or min(len(images), 4)
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    out = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        out.paste(im, ((i % cols) * w, (i // cols) * h))
    return out


class Generator:
    """Generates images from a bundle, optionally with learned tokens."""

    def __init__(self, bundle: str | Path | Bundle, *, profile: str | object = "auto", strict: bool = False,
                 warn: Warn | None = None, embeddings: Iterable[str | Path] = (),
                 extra_tokens: Iterable[tuple[str, np.ndarray]] = (), sessions: BundleSessions | None = None,
                 text: PromptEncoder | None = None):
        from ..profiles import resolve_profile

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.profile = resolve_profile(profile) if isinstance(profile, str) else profile
        self.sessions = sessions or BundleSessions(self.bundle, self.profile, strict, warn)
        if text is None:
            text = bundle_prompt_encoder(self.bundle)
        self.text = text
        files = load_embeddings(embeddings, self.bundle.family)
        for token, rows in [*files, *extra_tokens]:
            self.text.add_embedding(token, rows)
        self.loaded, self.warn = [token for token, _ in files], warn  # tokens from files: a prompt without them is a mistake

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The U-Net's text conditions, one row per prompt: ``encoder_hidden_states``, and for SDXL
        ``text_embeds`` and ``time_ids`` (the bundle's resolution, uncropped)."""
        if isinstance(self.text, XLPromptEncoder):
            conds = self.text.condition([self.text.embed(p) for p in prompts], self.sessions.run)
            return {k: np.concatenate([c[k] for c in conds]) for k in conds[0]}
        te = self.sessions.get("text_encoder")
        embeds = np.concatenate([self.text.embed(p) for p in prompts])
        return {"encoder_hidden_states": te.run(["last_hidden_state"], {"inputs_embeds": embeds})[0]}

    def conditions(self, prompt: str, negative_prompt: str, guidance: bool) -> dict[str, np.ndarray]:
        """Rows (negative, prompt) under guidance, else (prompt). An SDXL pipeline configured with
        ``force_zeros_for_empty_prompt`` (the base model is) conditions on zeros, hidden states and
        pooled embedding both, when there is no negative prompt: so does this."""
        zeros = (guidance and not negative_prompt and isinstance(self.text, XLPromptEncoder)
                 and self.bundle.manifest.get("conditioning", {}).get("force_zeros_for_empty_prompt", True))
        if zeros:
            cond = self.encode_prompts([prompt])
            neg = {k: v if k == "time_ids" else np.zeros_like(v) for k, v in cond.items()}
            cond = {k: np.concatenate([neg[k], v]) for k, v in cond.items()}
        else:
            cond = self.encode_prompts([negative_prompt, prompt] if guidance else [prompt])
        if not self.profile.resident_sessions:
            self.sessions.release("text_encoder")
            self.sessions.release("text_encoder_2")
        return cond

    def generate(self, prompt: str, *, negative_prompt: str = "", n: int = 1, steps: int = 30, guidance: float = 7.5,
                 seed: int = 0, scheduler: str = "ddim", tile: int | None = None,
                 progress: Callable[[int, int], None] | None = None) -> list[Image.Image]:
        """``n`` images of ``prompt`` with classifier-free guidance (``guidance`` 1 disables it)."""
        m = self.bundle.manifest
        check_generation(n=n, steps=steps, guidance=guidance, seed=seed,
                         train_steps=m["scheduler"].get("num_train_timesteps", 1000), tile=tile)
        unused = [tok for tok in self.loaded if tok not in prompt and tok not in negative_prompt]
        if unused and self.warn:
            self.warn(f"{', '.join(unused)} not in the prompt: the embedding(s) loaded for it have no effect")
        for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            lost = self.text.dropped(text)
            if lost and self.warn:
                self.warn(f"{what} is longer than the text encoder reads ({self.text.max_length} tokens); "
                          f"ignored: {lost[:80]!r}{'...' if len(lost) > 80 else ''}")
        cfg = guidance != 1.0
        cond = self.conditions(prompt, negative_prompt, cfg)
        sampler = make_sampler(scheduler, m["scheduler"], steps)
        rng = np.random.default_rng(seed)
        h = m["latent_size"]
        latents = (rng.standard_normal((n, m["latent_channels"], h, h)) * sampler.init_noise_sigma).astype(np.float32)
        unet = self.sessions.get("unet")
        ctx = {k: np.repeat(c, n, axis=0) if not cfg else np.concatenate([np.repeat(c[:1], n, 0), np.repeat(c[1:], n, 0)])
               for k, c in cond.items()}
        batch = self.profile.batch_perturbations  # low-memory profiles run one sample per U-Net call
        # one image under guidance: both conditions share the latent, and a U-Net with a shared
        # prefix (export/prefix.py) takes it once
        one_row = batch and cfg and n == 1 and self.bundle.shared_prefix
        for i, t in enumerate(sampler.timesteps):
            x = sampler.scale_model_input(latents, i).astype(np.float32)
            x_in = np.concatenate([x, x]) if cfg and not one_row else x
            if batch:
                pred = self._unet(unet, x_in, t, ctx)
            else:
                pred = np.concatenate([self._unet(unet, x_in[j : j + 1], t, {k: c[j : j + 1] for k, c in ctx.items()})
                                       for j in range(len(x_in))])
            if cfg:
                uncond, text = pred[:n], pred[n:]
                pred = uncond + guidance * (text - uncond)
            latents = sampler.step(pred, i, latents).astype(np.float32)
            if progress:
                progress(i + 1, len(sampler.timesteps))
        self.sessions.release("unet")  # the decoder never shares memory with the U-Net
        images = self.decode(latents, tile=tile)
        if not self.profile.resident_sessions:
            self.sessions.release("vae_decoder")
        return to_pil(images)

    @staticmethod
    def _unet(sess, x: np.ndarray, t, ctx: dict[str, np.ndarray]) -> np.ndarray:
        return sess.run(["out_sample"], {"sample": x, "timestep": np.full((len(x),), t, np.float32), **ctx})[0]

    def decode(self, latents: np.ndarray, tile: int | None = None) -> np.ndarray:
        """VAE-decode one latent at a time; ``tile`` (latent pixels) decodes in overlapping tiles to bound memory."""
        dec = self.sessions.get("vae_decoder")
        scale = self.bundle.manifest["latent_scale"]

        def run(z: np.ndarray) -> np.ndarray:
            return dec.run(["image"], {"latent": np.ascontiguousarray(z, dtype=np.float32)})[0]

        out = []
        for i in range(len(latents)):
            z = latents[i : i + 1] / scale
            out.append(run(z) if tile is None else decode_tiled(run, z, tile))
        return np.concatenate(out)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(size - tile, 0) + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def decode_tiled(run: Callable[[np.ndarray], np.ndarray], z: np.ndarray, tile: int, overlap: int | None = None) -> np.ndarray:
    """Decode ``z`` [1, c, h, w] in tiles of ``tile`` latent pixels, blending overlaps with linear ramps.

    Peak decoder memory then scales with the tile, not the image. Seams are smoothed, not
    removed: the decoder's GroupNorm sees each tile's statistics.
    """
    _, _, h, w = z.shape
    if tile >= max(h, w):
        return run(z)
    if tile < MIN_TILE:
        raise UserError(f"--tile must be at least {MIN_TILE} latent pixels")
    overlap = max(1, tile // 4) if overlap is None else overlap
    stride = tile - overlap
    acc = weight = None
    for y in _starts(h, tile, stride):
        for x in _starts(w, tile, stride):
            part = run(z[:, :, y : y + tile, x : x + tile])
            f = part.shape[-1] // min(tile, w)  # the decoder's upsampling factor
            if acc is None:
                acc = np.zeros((1, part.shape[1], h * f, w * f), np.float64)
                weight = np.zeros((1, 1, h * f, w * f), np.float64)
            ramp = lambda n: np.minimum(np.arange(n) + 1, np.arange(n)[::-1] + 1).clip(max=overlap * f)  # noqa: E731
            wgt = np.outer(ramp(part.shape[-2]), ramp(part.shape[-1]))[None, None].astype(np.float64)
            acc[:, :, y * f : y * f + part.shape[-2], x * f : x * f + part.shape[-1]] += part * wgt
            weight[:, :, y * f : y * f + part.shape[-2], x * f : x * f + part.shape[-1]] += wgt
    return (acc / weight).astype(np.float32)
