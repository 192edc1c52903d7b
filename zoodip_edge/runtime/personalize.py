"""Forward-only ZOODiP personalization on ONNX Runtime sessions (the device stage).

    from zoodip_edge.runtime import Personalizer
    p = Personalizer("bundle/", "photos/", token="<my-dog>", init="dog")
    for record in p.run(steps=2000):
        ...                                   # progress, cancellation: just stop iterating
    p.save("learned_embeds.safetensors")

The loop per step (docs/algorithm.md): the optimizer proposes t (PUTS) and n perturbed tokens;
one image, caption, latent sample and noise ε are drawn from the step's noise seed and
shared by all n + 1 evaluations; the text encoder and U-Net give n + 1 losses; the
optimizer applies RGE -> Subspace Gradient -> ZOAdam. No torch, no gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from .. import __version__
from ..bundle import Bundle, load_bundle
from ..errors import UserError
from ..files import refuse_existing, save_image
from ..schedule import alphas_cumprod, noisy_and_target
from ..schema import Int, Num, Obj, Optional, SchemaError, Str, check
from .checkpoint import check_checkpoint_path, load_checkpoint, save_checkpoint
from .checks import check_seed
from .init_search import SearchResult, search_initializer, search_probes
from .memory import check_memory
from .runlog import RunLog, check_log_path
from .sensitivity import response_basis
from .sessions import BundleSessions, return_free_memory
from .stopping import Plateau, stop_probes
from .text import TEMPLATES, XLPromptEncoder, bundle_prompt_encoder
from .zo import OutOfRange, StepRecord, ZOConfig, ZOOptimizer, fits_float32, vocabulary_basis

Warn = Callable[[str], None]
GUIDE_PROMPTS = 4  # prompts guide_encoder's Jacobian is read on (d + 1 text encoder passes each)
GUIDE_H = 1e-2  # its forward-difference step


@dataclass(frozen=True)
class Settings:
    """What a user may override; ``None`` means the bundle family's default (docs/algorithm.md)."""

    n: int | None = None
    mu: float | None = None
    lr: float | None = None
    tau: int | None = None
    nu: float | None = None
    t_low: int | None = None
    t_high: int | None = None
    subspace: bool = True  # Subspace Gradient (off = the paper's "no SG" ablation)
    puts: bool = True  # Partial Uniform Timestep Sampling (off = t ~ U{0..999})
    seed: int = 0
    templates: str = "object"  # textual-inversion templates when no captions are given
    batch_perturbations: bool | None = None  # None: the device profile decides
    guide_momentum: bool | None = None  # guided directions (zo.py); None: the bundle's default, else off
    guide_k: int | None = None
    guide_alpha: float | None = None
    guide_vocab: int | None = None
    guide_encoder: int | None = None
    guide_refresh: int | None = None
    search_init: bool | None = None  # search the start first (the caller runs search_start()); None: the bundle's default

    def zo_config(self, defaults: dict, num_train_timesteps: int) -> ZOConfig:
        base = ZOConfig()  # for what a bundle's defaults do not name (bundles before guided directions)
        pick = lambda k: getattr(self, k) if getattr(self, k) is not None else defaults.get(k, getattr(base, k))  # noqa: E731
        t_low, t_high = (pick("t_low"), pick("t_high")) if self.puts else (0, num_train_timesteps)
        if not 0 <= t_low < t_high <= num_train_timesteps:
            raise UserError(f"timestep range [{t_low}, {t_high}) is not inside [0, {num_train_timesteps})")
        cfg = ZOConfig(n=pick("n"), mu=pick("mu"), lr=pick("lr"), tau=pick("tau"), nu=pick("nu"),
                       t_low=t_low, t_high=t_high, subspace=self.subspace, guide_momentum=bool(pick("guide_momentum")),
                       guide_k=int(pick("guide_k")), guide_alpha=pick("guide_alpha"),
                       guide_vocab=int(pick("guide_vocab")), guide_encoder=int(pick("guide_encoder")),
                       guide_refresh=int(pick("guide_refresh")))
        bad = {"n": not 1 <= cfg.n <= 256, "mu": not 0 < cfg.mu < float("inf"), "lr": not 0 < cfg.lr < float("inf"),
               "tau": not 2 <= cfg.tau <= 4096, "nu": not 0 <= cfg.nu < 1, "guide_k": not 0 <= cfg.guide_k <= 256,
               "guide_vocab": not 0 <= cfg.guide_vocab <= 256, "guide_encoder": not 0 <= cfg.guide_encoder <= 256,
               "guide_refresh": not 1 <= cfg.guide_refresh,
               "guide_alpha": not 0 < cfg.guide_alpha <= 1}
        ranges = {"n": "1..256", "mu": "a finite number > 0", "lr": "a finite number > 0", "tau": "2..4096",
                  "nu": "in [0, 1)", "guide_k": "0..256", "guide_vocab": "0..256", "guide_alpha": "in (0, 1]",
                  "guide_encoder": "0..256", "guide_refresh": "at least 1"}
        for key, wrong in bad.items():
            if wrong:
                raise UserError(f"{key} must be {ranges[key]}, got {getattr(cfg, key)}")
        check_seed(self.seed)
        return cfg


def vocabulary_prior(text, k: int) -> np.ndarray:
    """The guiding directions of ``guide_vocab``: the top-k principal directions of the token table
    (SDXL: of each table, in its own part of theta)."""
    blocks = []
    for enc, cols in text.parts:
        block = np.zeros((k, text.width))
        block[:, cols] = vocabulary_basis(enc.table, k)
        blocks.append(block)
    return np.concatenate(blocks)


class NonFiniteLoss(UserError):
    """Training diverged: the step that produced NaN or infinity was not applied."""


@dataclass
class Example:
    """One training image, VAE-encoded once: latents are sampled from N(mean, std²) per step."""

    name: str
    mean: np.ndarray
    std: np.ndarray
    caption: str | None
    sha256: str  # of the decoded, resized pixels (and SDXL's time ids): what the run depends on (a resume compares it)
    time_ids: np.ndarray | None = None  # SDXL: the photo's size and crop (images.sdxl_time_ids)


class Personalizer:
    """Learns the embedding of ``token`` for the concept in ``images`` on a bundle."""

    def __init__(
        self,
        bundle: str | Path | Bundle,
        images: str | Path | Sequence[str | Path],
        token: str,
        init: str,
        *,
        settings: Settings = Settings(),
        captions: str | Path | dict[str, str] | None = None,
        profile: str | Any = "auto",
        strict: bool = False,
        warn: Warn | None = None,
        init_embedding: np.ndarray | Mapping[str, np.ndarray] | None = None,
    ):
        from ..profiles import resolve_profile
        from .images import load_captions, load_images_and_sizes

        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        m = self.bundle.manifest
        if settings.templates not in TEMPLATES:
            raise UserError(f"unknown templates {settings.templates!r} (object or style)")
        self.settings = settings
        self.profile = resolve_profile(profile) if isinstance(profile, str) else profile
        self.batch = self.profile.batch_perturbations if settings.batch_perturbations is None else settings.batch_perturbations
        self.token, self.init = token, init

        self.text = bundle_prompt_encoder(self.bundle)
        self.sdxl = isinstance(self.text, XLPromptEncoder)  # θ is both tables' rows side by side
        # A start: SD1/SD2 [d] or [1, d]; SDXL {"clip_l": [1, d1], "clip_g": [1, d2]} (a file's) or θ's [d1 + d2].
        if init_embedding is None:
            theta0 = self.text.init_row(init)
        else:
            theta0 = self.text.as_row(init_embedding, "the initial embedding")
        self.text.add_token(token)
        self.theta0 = theta0
        self.init_embedding = None if init_embedding is None else theta0.copy()  # part of the run's identity

        self.abar = alphas_cumprod(m["scheduler"])
        self.prediction_type = m["scheduler"].get("prediction_type", "epsilon")
        self.config = settings.zo_config(m["defaults"], len(self.abar))  # bad hyperparameters fail before any work
        if self.config.guide_encoder and self.sdxl:
            raise UserError("guide_encoder reads one text encoder's response; SDXL bundles have two (not supported yet)")
        check_memory(self.bundle, self.profile, guide_encoder=self.config.guide_encoder)  # over the profile's budget: one line now, not the OS's kill later
        fidelity = m.get("verification", {}).get("zo_fidelity", {})
        if warn and fidelity and not fidelity.get("passed", True):
            warn(f"this {m['recipe']['name']} bundle failed its ZO fidelity gate (pearson {fidelity['pearson']:.2f} at mu "
                 f"{fidelity['mu']:g}; exported with --allow-unfaithful): training may follow rounding noise")
        elif warn and fidelity.get("mu") and self.config.mu < fidelity["mu"]:
            warn(f"mu {self.config.mu:g} is below the {fidelity['mu']:g} this bundle's ZO fidelity gate verified "
                 f"({m['recipe']['name']}); its finite differences may follow rounding noise there")

        loaded = load_images_and_sizes(images, m["resolution"])
        names = [n for n, _, _ in loaded]
        caps = load_captions(captions, names) if isinstance(captions, (str, Path)) else captions
        if caps is not None:
            bad = [n for n in names if "{}" not in caps.get(n, "")]
            if bad:
                raise UserError(f"captions must give every image a caption containing {{}}; missing or without {{}}: {', '.join(bad)}")
        self.sessions = BundleSessions(self.bundle, self.profile, strict, warn)
        self.examples = self._encode(loaded, caps)

        # the vocabulary's principal directions (guided directions; the bundle's own rows, without the new token)
        self.prior = vocabulary_prior(self.text, self.config.guide_vocab) if self.config.guide_vocab else None
        self.optimizer = ZOOptimizer(theta0, self.config, settings.seed, self.prior)
        self.guide_read_at: int | None = None  # the step guide_encoder's directions were last read at
        self.last_loss: float | None = None
        self.stopped_early = False  # set by run() when --steps auto stopped it
        self.start = init  # the word the token starts from, or what search_start() found
        self.found: SearchResult | None = None
        # a given start embedding (continued training) is the start: nothing to search
        self.search_init = init_embedding is None and bool(settings.search_init if settings.search_init is not None
                                                           else m["defaults"].get("search_init", False))

    # ------------------------------------------------------------------ data ----------
    def _encode(self, loaded: list[tuple[str, np.ndarray, tuple[int, int]]], caps: dict[str, str] | None) -> list[Example]:
        """VAE-encode each image once, then release the VAE so it never shares memory with the U-Net.

        SDXL's U-Net is told each photo's original size and crop (``time_ids``), as diffusers' SDXL
        textual inversion tells it; generation asks for an uncropped image at the bundle's size."""
        from .images import sdxl_time_ids

        vae = self.sessions.get("vae_encoder")
        out = []
        for name, img, size in loaded:
            mean, logvar = vae.run(["mean", "logvar"], {"image": img[None].astype(np.float32)})
            ids = sdxl_time_ids(size, int(self.bundle.manifest["resolution"])) if self.sdxl else None
            digest = hashlib.sha256(np.ascontiguousarray(img, np.float32).tobytes() + (b"" if ids is None else ids.tobytes()))
            out.append(Example(name, mean[0], np.exp(0.5 * logvar[0]), caps[name] if caps else None, digest.hexdigest(), ids))
        self.sessions.release("vae_encoder")
        return out

    def draw(self, t: int, noise_seed: int) -> tuple[str, np.ndarray, np.ndarray]:
        """Caption, z_t and target for one step, all from ``noise_seed`` (common random numbers)."""
        return self.draw_example(t, noise_seed)[1:]

    def draw_example(self, t: int, noise_seed: int) -> tuple[Example, str, np.ndarray, np.ndarray]:
        """``draw``, and the example it drew."""
        rng = np.random.default_rng(noise_seed)
        ex = self.examples[int(rng.integers(len(self.examples)))]
        templates = TEMPLATES[self.settings.templates]
        caption = ex.caption if ex.caption is not None else templates[int(rng.integers(len(templates)))]
        z = self.bundle.manifest["latent_scale"] * (ex.mean + ex.std * rng.standard_normal(ex.mean.shape, dtype=np.float32))
        eps = rng.standard_normal(z.shape, dtype=np.float32)
        zt, target = noisy_and_target(z[None], eps[None], t, self.abar, self.prediction_type)
        return ex, caption.replace("{}", self.token), zt, target

    # ------------------------------------------------------------------ model ---------
    def losses(self, thetas: np.ndarray, t: int, noise_seed: int, words: str | None = None) -> np.ndarray:
        """Diffusion loss at each row of ``thetas`` on one shared (image, t, ε); with ``words``
        the prompt names the concept in words instead of the token (a reference loss; thetas unused)."""
        ex, prompt, zt, target = self.draw_example(t, noise_seed)
        embeds = self.text.embed(prompt, thetas) if words is None else self.text.embed(prompt.replace(self.token, words))
        # Text encoder(s) first for every chunk, so a profile that loads sessions in turn loads each once per step.
        if self.sdxl:  # both encoders; the U-Net also takes the pooled text and the time ids
            chunks = [embeds] if self.batch else embeds.rows()
            conds = self.text.condition(chunks, self.sessions.run, ex.time_ids)
            sizes = [len(c.first) for c in chunks]
        else:
            chunks = [embeds] if self.batch else [e[None] for e in embeds]
            te = self.sessions.get("text_encoder")
            conds = [{"encoder_hidden_states": self._run(te, {"inputs_embeds": c}, "last_hidden_state",
                                                         keep_on_device=self.profile.resident_sessions)} for c in chunks]
            sizes = [len(c) for c in chunks]
        unet = self.sessions.get("unet")
        out = []
        for size, cond in zip(sizes, conds):
            rows = 1 if self.bundle.shared_prefix else size  # such a U-Net runs its prefix once for the chunk
            feed = {"sample": np.repeat(zt, rows, 0), "timestep": np.full((rows,), t, np.float32), **cond}
            pred = self._run(unet, feed, "out_sample", keep_on_device=False)
            out.append(np.mean((pred.astype(np.float64) - target) ** 2, axis=(1, 2, 3)))
        return np.concatenate(out)

    def conditions_of(self, prompt: str, thetas: np.ndarray) -> np.ndarray:
        """The U-Net's text condition for each row of ``thetas`` in ``prompt``, flattened [rows, N] (SD1/SD2)."""
        out = self.sessions.get("text_encoder").run(["last_hidden_state"], {"inputs_embeds": self.text.embed(prompt, thetas)})[0]
        return out.reshape(len(thetas), -1)

    def read_guide(self) -> None:
        """Read ``guide_encoder``'s directions at the current token (a forward-difference Jacobian of
        the text encoder on the first few prompts training draws from; no U-Net pass)."""
        templates = TEMPLATES[self.settings.templates]
        captions = sorted({e.caption for e in self.examples if e.caption is not None}) or templates
        prompts = [c.replace("{}", self.token) for c in captions[:GUIDE_PROMPTS]]
        basis = response_basis(self.conditions_of, prompts, self.theta, self.config.guide_encoder, GUIDE_H)
        self.optimizer.set_prior(basis if self.prior is None else np.concatenate([self.prior, basis]))
        self.guide_read_at = self.step_index
        return_free_memory()

    def _run(self, sess, feed: dict, output: str, keep_on_device: bool):
        """One output of ``sess``; with IOBinding (GPU profiles) it may stay on the device as an OrtValue."""
        if not self.profile.io_binding:
            return sess.run([output], feed)[0]
        device = "cuda" if sess.get_providers()[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        binding = sess.io_binding()
        for name, value in feed.items():
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, value)
            else:
                binding.bind_ortvalue_input(name, value)
        binding.bind_output(output, device if keep_on_device else "cpu")
        sess.run_with_iobinding(binding)
        value = binding.get_outputs()[0]
        return value if keep_on_device else value.numpy()

    def held_out_loss(self, theta: np.ndarray | None, probes: Sequence[tuple[int, int]], words: str | None = None) -> float:
        """Mean loss of ``theta`` (or of the prompt with ``words`` in the token's place) over fixed
        (t, noise seed) probes: a learning signal independent of training draws."""
        rows = None if theta is None else np.atleast_2d(theta)
        return float(np.mean([self.losses(rows, t, s, words)[0] for t, s in probes]))

    # ------------------------------------------------------------------ loop ----------
    @property
    def theta(self) -> np.ndarray:
        return self.optimizer.theta

    @property
    def step_index(self) -> int:
        return self.optimizer.step_index

    def search_start(self) -> SearchResult:
        """Start from the vocabulary token (or mix of the best few) that best explains the photos,
        found with forward passes only (init_search.py); replaces the start before any step."""
        if self.step_index:
            raise UserError("the start can only be searched before the first step")
        found = search_initializer(self, search_probes(self.config.t_low, self.config.t_high))
        self.theta0 = found.theta
        self.optimizer = ZOOptimizer(found.theta, self.config, self.settings.seed, self.prior)
        self.start, self.found = found.label, found
        return found

    def step(self) -> StepRecord:
        """One ZO step; NonFiniteLoss (nothing changed) if a loss or the new token is not finite."""
        c = self.config
        if c.guide_encoder and (self.guide_read_at is None or self.step_index - self.guide_read_at >= c.guide_refresh):
            self.read_guide()
        plan = self.optimizer.propose()
        losses = self.losses(plan.thetas, plan.t, plan.noise_seed) if fits_float32(plan.thetas) else np.array([np.inf])
        if not np.all(np.isfinite(losses)):
            raise NonFiniteLoss(f"the loss became non-finite at step {plan.step + 1} (t={plan.t}); "
                                f"a smaller --lr (now {self.config.lr:g}) or --mu (now {self.config.mu:g}) may help")
        try:
            record = self.optimizer.update(plan, losses)
        except OutOfRange:  # a token the graphs cannot take would only fail at the next step
            raise NonFiniteLoss(f"the token left the float32 range at step {plan.step + 1}; "
                                f"a smaller --lr (now {self.config.lr:g}) may help") from None
        self.last_loss = float(record.losses[0])
        return_free_memory()  # the step's freed activations, before the next one allocates again
        return record

    def run(self, steps: int, stop: Plateau | None = None) -> Iterator[StepRecord]:
        """Step until ``steps`` steps are done in total (counting resumed ones), or until ``stop``
        (``--steps auto``) sees the held-out probes stop improving; stop iterating to cancel."""
        if self.search_init and self.step_index == 0 and self.found is None:
            self.search_start()
        probes = stop_probes(self.config.t_low, self.config.t_high) if stop else []
        if stop and not stop.readings:
            stop.update(self.step_index, self.held_out_loss(self.theta, probes), self.theta)
        while self.optimizer.step_index < steps:
            record = self.step()
            yield record
            if stop and stop.due(self.step_index) and stop.update(
                    self.step_index, self.held_out_loss(self.theta, probes), self.theta):
                self.stopped_early = True
                self.optimizer.theta = stop.best_theta.copy()  # the best reading's token is the result
                return

    def check_checkpoint(self, checkpoint: Path | None, resume: bool, force: bool) -> None:
        """Refuse what ``train`` may not do at ``checkpoint``: write over anything but a checkpoint,
        over another run's without ``force``, over this run's without ``resume`` or ``force``, or
        resume another run's."""
        if checkpoint is None:
            if resume:
                raise UserError("resume needs the checkpoint to resume from")
            return
        theirs = check_checkpoint_path(checkpoint, resume)
        diff = self.identity_differences(theirs) if theirs is not None else []
        if diff and (resume or not force):
            raise UserError(f"checkpoint {checkpoint} belongs to a different run (differs in: {', '.join(diff)})"
                            f"{'' if resume else '; pass --force to replace it'}")
        if theirs is not None and not diff and not resume and not force:
            raise UserError(f"{checkpoint} is this run's checkpoint; pass --resume to continue or --force to start over")

    def train(
        self,
        steps: int,
        *,
        stop: Plateau | None = None,
        checkpoint: str | Path | None = None,
        checkpoint_every: int = 100,
        resume: bool = False,
        force: bool = False,
        log: str | Path | None = None,
        preview_every: int = 0,
        preview_prefix: str | Path | None = None,
        on_step: Callable[[StepRecord], None] | None = None,
        say: Callable[[str], None] | None = None,
        out: str | Path | None = None,
        fmt: str = "diffusers",
    ) -> None:
        """The whole training run, as ``zoodip-edge personalize`` runs it.

        Everything that would be written over is checked first (a ``checkpoint`` path holding
        another run's checkpoint needs ``force``, anything else there is refused; ``resume``
        continues this run's; a file at ``out`` needs ``force``, or ``resume`` when this run
        wrote it), then the start is searched if the bundle says so, then the steps run: each is
        logged to ``log`` (JSONL, replayable), a checkpoint is written every ``checkpoint_every``
        steps and at the end, a preview image ``{preview_prefix}-NNNNNN.png`` every
        ``preview_every`` steps; at the end the embedding is saved to ``out`` (in ``fmt``). On
        Ctrl-C the checkpoint is written before KeyboardInterrupt goes on; a loss that becomes
        non-finite raises NonFiniteLoss saying which checkpoint is kept. ``on_step`` sees every
        StepRecord (progress bars, stopping).
        """
        if preview_every:  # a resident profile then keeps the VAE decoder loaded too
            check_memory(self.bundle, self.profile, preview=True, guide_encoder=self.config.guide_encoder)
        ckpt = Path(checkpoint) if checkpoint is not None else None
        self.check_checkpoint(ckpt, resume, force)
        if out is not None and os.path.lexists(out) and not force:
            if not resume:
                raise UserError(f"{out} exists; pass --force to replace it")
            if not self.wrote(out):
                raise UserError(f"{out} exists and is not this run's embedding; pass --force to replace it")
        if log is not None:
            check_log_path(Path(log), resume, force)
        if resume:
            self.load_checkpoint(ckpt)
        prefix = str(preview_prefix) if preview_prefix is not None else None
        previews = [Path(f"{prefix}-{s:06d}.png") for s in range(self.step_index + 1, steps + 1)
                    if prefix and preview_every and s % preview_every == 0]
        if not force and not resume:
            refuse_existing(previews)
        if self.search_init and not resume:  # the last thing before the steps: every refusal came first
            found = self.search_start()
            if say:
                say(f"start: {found.label} (held-out probe loss {found.loss:.4f}; {found.forwards} forward passes)")
        runlog = None
        if log is not None:
            header = {"type": "start", "token": self.token, "init": self.init, "seed": self.settings.seed,
                      "bundle": self.bundle.manifest_sha256, "config": dataclasses.asdict(self.config),
                      "theta0": self.theta0.tolist()}
            runlog = RunLog.open(Path(log), header, step=self.step_index, resume=resume, force=force)
        saved = None
        try:
            for record in self.run(steps, stop):
                if runlog:
                    runlog.write(record)
                if on_step:
                    on_step(record)
                if ckpt is not None and checkpoint_every and self.step_index % checkpoint_every == 0:
                    self.save_checkpoint(ckpt)
                    saved = self.step_index
                if prefix and preview_every and self.step_index % preview_every == 0:
                    self.preview(f"{prefix}-{self.step_index:06d}.png")
        except NonFiniteLoss as e:
            kept = (f"the checkpoint of step {saved} is kept ({ckpt})" if saved is not None
                    else f"{ckpt} is kept as it was" if resume else "no checkpoint of this run was written")
            raise NonFiniteLoss(f"{e}; {kept}") from None
        except KeyboardInterrupt:
            if ckpt is not None:
                self.save_checkpoint(ckpt)
            raise
        finally:
            if runlog:
                runlog.close()
        if ckpt is not None:
            self.save_checkpoint(ckpt)
        if out is not None:
            self.save(out, fmt=fmt)

    def preview(self, path: str | Path, steps: int = 20, seed: int = 0) -> None:
        """Render one image of the first caption/template with the current θ (sessions are shared)."""
        from .generate import Generator

        templates = TEMPLATES[self.settings.templates]
        prompt = (self.examples[0].caption or templates[0]).replace("{}", self.token)
        g = Generator(self.bundle, profile=self.profile, sessions=self.sessions,
                      extra_tokens=[(self.token, self.theta[None])])
        save_image(g.generate(prompt, steps=steps, seed=seed)[0], Path(path))

    # ------------------------------------------------------------------ files ---------
    def provenance(self) -> dict[str, str]:
        c = self.config
        return {
            "tool": f"zoodip-edge {__version__}", "method": "ZOODiP", "token": self.token, "init": self.init,
            "start": self.start, "bundle_manifest_sha256": self.bundle.manifest_sha256, "family": self.bundle.family,
            "recipe": self.bundle.recipe, "steps": str(self.step_index), "seed": str(self.settings.seed),
            "hyperparameters": json.dumps(dataclasses.asdict(c)), "final_loss": f"{self.last_loss}" if self.last_loss is not None else "",
            "images": json.dumps([e.name for e in self.examples]),
        }

    def save(self, path: str | Path, fmt: str = "diffusers") -> None:
        from ..embeddings import save_embedding

        rows = self.theta.astype(np.float32)[None]
        if self.sdxl:  # the SDXL layout, whatever fmt: A1111 and diffusers both read it
            first, second = self.text.split(rows)
            rows = {"clip_l": first, "clip_g": second}
        save_embedding(path, self.token, rows, self.provenance(), fmt=fmt)

    def wrote(self, path: str | Path) -> bool:
        """Whether the embedding file at ``path`` was written by this run (its provenance says so)."""
        from safetensors import SafetensorError, safe_open

        if not Path(path).is_file():
            return False
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError):
            return False
        mine = self.provenance()
        return all(meta.get(k) == mine[k] for k in ("token", "init", "bundle_manifest_sha256", "seed", "images"))

    def _identity(self) -> dict[str, Any]:
        """Everything a run's result depends on, bar rounding (device, batching): a checkpoint
        resumes only under the same identity."""
        given = self.init_embedding
        return {"bundle": self.bundle.manifest_sha256, "token": self.token, "init": self.init,
                "config": dataclasses.asdict(self.config), "seed": self.settings.seed,
                "images": [[e.name, e.sha256] for e in self.examples],
                "captions": {e.name: e.caption for e in self.examples} if self.examples[0].caption is not None else None,
                "templates": self.settings.templates, "search_init": self.search_init,
                "init_embedding": None if given is None else hashlib.sha256(given.tobytes()).hexdigest()}

    def save_checkpoint(self, path: str | Path) -> None:
        save_checkpoint(Path(path), {"identity": json.dumps(self._identity(), sort_keys=True),
                                     "optimizer": self.optimizer.state_dict(), "last_loss": self.last_loss,
                                     "theta0": self.theta0, "start": self.start,
                                     **({} if self.guide_read_at is None else {"guide_read_at": self.guide_read_at})})

    def identity_differences(self, identity: dict[str, Any]) -> list[str]:
        """What makes a checkpoint's recorded ``identity`` another run's (empty: this run's)."""
        mine, theirs = self._identity(), dict(identity)
        if isinstance(theirs.get("config"), dict):  # options added since it was written were off then: defaults
            theirs["config"] = {**dataclasses.asdict(ZOConfig()), **theirs["config"]}
        return [k for k in mine if mine[k] != theirs.get(k)]

    def load_checkpoint(self, path: str | Path) -> None:
        state = load_checkpoint(Path(path))
        try:
            identity = json.loads(state["identity"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"checkpoint {path} records no run identity") from None
        diff = self.identity_differences(identity if isinstance(identity, dict) else {})
        if diff:
            raise UserError(f"checkpoint {path} belongs to a different run (differs in: {', '.join(diff)})")
        d, tau = self.theta0.size, self.config.tau
        try:
            check(state, CHECKPOINT_SCHEMA)
            opt = state["optimizer"]
            shapes = {"optimizer.theta": (opt["theta"], (d,)), "optimizer.adam.m": (opt["adam"]["m"], (d,)),
                      "optimizer.adam.v": (opt["adam"]["v"], (d,)), "optimizer.sg.buffer": (opt["sg"]["buffer"], (tau, d))}
            if "prior" in opt:  # guiding directions, one per row: the vocabulary's, then the encoder's once read
                rows = 0 if self.prior is None else len(self.prior)
                read = rows + self.config.guide_encoder if np.shape(opt["prior"])[:1] != (rows,) else rows
                shapes["optimizer.prior"] = (opt["prior"], (read, d))
            for name, (value, shape) in shapes.items():
                if not isinstance(value, np.ndarray) or value.shape != shape or not np.all(np.isfinite(value)):
                    raise SchemaError(f"{name}: expected {shape} finite values")
            self.optimizer.load_state_dict(opt)
        except (SchemaError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"checkpoint {path} is malformed: {e}"[:300]) from None
        self.last_loss = state.get("last_loss")
        if "theta0" in state:  # a searched start is the run's start: resumed logs and provenance say so
            self.theta0 = np.asarray(state["theta0"], dtype=np.float64).reshape(self.theta0.shape)
            self.start = str(state.get("start", self.start))
        self.guide_read_at = state.get("guide_read_at")


def _array(value: Any, where: str) -> None:
    if not isinstance(value, np.ndarray):
        raise SchemaError(f"{where}: expected an array, got {type(value).__name__}")


#: The parts of a checkpoint's state a resume reads; shapes are checked against the run.
CHECKPOINT_SCHEMA = Obj({
    "identity": Str(),
    "optimizer": Obj({"theta": _array, "step": Int(0), "rng": Obj({"bit_generator": Str(("PCG64",)), "state": Obj({})}),
                      "adam": Obj({"m": _array, "v": _array, "t": Int(0)}),
                      "sg": Obj({"buffer": _array, "count": Int(0), "p": _array})},
                     optional={"history": _array, "prior": _array}),
}, optional={"last_loss": Optional(Num()), "theta0": _array, "start": Str(), "guide_read_at": Int(0)})
