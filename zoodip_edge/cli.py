"""The ``zoodip-edge`` command: a thin layer over the Python API.

Every command turns a UserError into one line on stderr and exit status 2, and a failure inside
ONNX Runtime (e.g. the GPU out of memory) into one line and exit status 1.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from .errors import UserError
from .files import check_writable, refuse_existing
from .personalize_options import BY_NAME
from .recipes import DEFAULT_RECIPE, recipe_choices

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Backpropagation-free personalization (ZOODiP) of INT8 Stable Diffusion on devices.")


def _err(msg: str) -> None:
    """One line, whatever a name read from a file holds (newlines, terminal escapes)."""
    clean = "".join(c if c.isprintable() else repr(c)[1:-1] for c in msg)
    typer.echo(f"error: {clean}", err=True)


def _check_out_folder(out: Path, writes: list[Path], force: bool) -> None:
    """A command that fills the folder ``out`` refuses, before any work, when ``out`` is a file or
    (without --force) already holds one of the files or folders it writes."""
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{out} is not a folder")
    if not force:
        refuse_existing(writes)
    check_writable(writes[0])  # a file inside ``out``: its folder (or the nearest one that exists) is tried


_MAIN = False  # set by main(): only a real process (not an in-process test runner) restarts itself


def _restart_for(profile) -> None:
    """Re-execute this command once with what ``profile`` needs set at process start (glibc's
    huge-page tunable); a no-op when nothing is needed or it is already set."""
    if not _MAIN:
        return
    from .runtime.sessions import hugetlb_restart_env

    env = hugetlb_restart_env(profile)
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, "-m", "zoodip_edge.cli", *sys.argv[1:]], env)


_OUT_OF_MEMORY = ("Available memory of", "out of memory", "Failed to allocate", "bad_alloc")


def _raised_by_onnxruntime(e: BaseException) -> bool:
    """ORT raises its own classes from its bindings, and plain RuntimeErrors from its Python layer."""
    if type(e).__module__.startswith("onnxruntime"):
        return True
    inner = traceback.extract_tb(e.__traceback__)[-1:]
    return any(f"{os.sep}onnxruntime{os.sep}" in frame.filename for frame in inner)


def _onnxruntime_failure(e: BaseException) -> str:
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0].removeprefix("Error in execution: ")
    line = f"onnxruntime failed: {msg[:400]}"
    if any(k in msg for k in _OUT_OF_MEMORY):
        line += ("; the device ran out of memory: a profile that uses less (--device cuda-lowvram, cpu-lowmem) "
                 "or a bundle exported at a smaller --resolution may fit")
    return line


def cli_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            _err(str(e))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            _err("interrupted")
            raise typer.Exit(130) from None
        except ImportError as e:
            _err(f"{e.name or e}: missing dependency; the export stage needs `pip install \"zoodip-edge[export]\"`")
            raise typer.Exit(2) from None
        except OSError as e:  # the disk full or gone, a file made unreadable mid-run: say which, in one line
            _err(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}")
            raise typer.Exit(1) from None
        except Exception as e:  # noqa: BLE001 - only ONNX Runtime's own failures are turned into a line
            if not _raised_by_onnxruntime(e):
                raise
            _err(_onnxruntime_failure(e))
            raise typer.Exit(1) from None

    return wrapper


@app.command()
@cli_errors
def export(
    model: str = typer.Argument(..., help="diffusers pipeline folder, hub id, or single-file .safetensors/.ckpt"),
    out: Path = typer.Option(..., "--out", "-o", help="bundle folder to write"),
    recipe: str = typer.Option(DEFAULT_RECIPE, help=recipe_choices()),
    resolution: Optional[int] = typer.Option(None, help="image size in pixels (default: the model's)"),
    force: bool = typer.Option(False, "--force", help="replace OUT if it is a zoodip-edge bundle (nothing else is replaced)"),
    allow_unfaithful: bool = typer.Option(False, "--allow-unfaithful", help="export even if the ZO fidelity gate fails"),
    config: Optional[str] = typer.Option(None, help="diffusers config folder or hub id (same family: SD1/SD2 or SDXL base) for a single-file checkpoint"),
    defaults: str = typer.Option("", help="ZOODiP defaults to record instead of the family's, e.g. 'lr=2e-2,mu=1e-2,tau=11,steps=1000'"),
) -> None:
    """Export a Stable Diffusion pipeline to a verified ONNX bundle (workstation)."""
    from .export import export_bundle
    from .families import parse_defaults

    manifest = export_bundle(model, out, recipe=recipe, resolution=resolution, force=force,
                             allow_unfaithful=allow_unfaithful, config=config, defaults=parse_defaults(defaults),
                             progress=lambda msg: typer.echo(f"[export] {msg}", err=True))
    v = manifest["verification"]
    typer.echo(f"exported {manifest['family']} ({recipe}) to {out}: ZO fidelity pearson {v['zo_fidelity']['pearson']:.4f}, "
               f"conditioning kept {v['conditioning_sensitivity']['ratio']:.3f}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _verification_line(v: dict) -> str:
    """The gates' figures in one line, or what the manifest says instead (a bundle made without them)."""
    try:
        f = v["zo_fidelity"]
        step = f" (step {f['step_norm']:.2g})" if "step_norm" in f else " (unit step: exported before zoodip-edge measured training's step)"
        return (f"ZO fidelity pearson {f['pearson']:.4f} at mu {f['mu']:g}{step}"
                f"{'' if f['passed'] else ' (FAILED: exported with --allow-unfaithful)'}; "
                f"conditioning kept {v['conditioning_sensitivity']['ratio']:.3f}; "
                f"text encoder max abs err {v['text_encoder_parity']['max_abs']:.2g}"
                + (f", second {v['text_encoder_2_parity']['max_abs']:.2g}" if "text_encoder_2_parity" in v else ""))
    except (KeyError, TypeError, ValueError):
        return f"no gate figures in the manifest{': ' + str(v['not_run']) if isinstance(v.get('not_run'), str) else ''}"


def _count(graph: str, count) -> str:
    """``unet 14``; counts by kind (Winograd's, by size and tile) also name each kind."""
    if not isinstance(count, dict):
        return f"{graph} {count}"
    kinds = ", ".join(f"{n} at {k.removeprefix('Conv ')}" for k, n in count.items())
    return f"{graph} {sum(count.values())}" + (f" ({kinds})" if kinds else "")


@app.command()
@cli_errors
def inspect(
    bundle: Path = typer.Argument(..., help="bundle folder"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Summarize a bundle and verify every file's hash."""
    from .bundle import FEATURES, compatibility, load_bundle
    from .cpu import slow_int8_math

    b = load_bundle(bundle, verify=True, run=False)  # read, even where this runtime would not run it
    m = b.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"bundle      {bundle}  (format {m['format_version']}, manifest sha256 {b.manifest_sha256[:16]})")
    typer.echo(f"model       {m['family']} from {m['source'].get('model')} ({m['source'].get('kind')})")
    typer.echo(f"recipe      {m['recipe']['name']}: {m['recipe']['description']}")
    typer.echo(f"resolution  {m['resolution']} px, latents {m['latent_channels']}x{m['latent_size']}x{m['latent_size']}, "
               f"scale {m['latent_scale']}, prediction {m['scheduler'].get('prediction_type')}")
    width = max(12, *(len(name) + 1 for name in m["components"]))  # text_encoder_2 (SDXL) is the longest
    for name, c in m["components"].items():
        size = c["bytes"] + sum(e["bytes"] for e in c.get("external_data", []))
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in c["inputs"])
        typer.echo(f"{name:<{width}}{_mb(size):>10}  {ins}")
    created = m.get("created", {})
    typer.echo(f"exporter    {created.get('tool', 'unknown')}, {created.get('date', 'undated')}")
    inferred = "" if "requires" in m else " (inferred from recipe.graphs: exported before manifests listed them)"
    typer.echo(f"requires    {', '.join(b.features) or 'no graph features'}{inferred}")
    for name, feature in FEATURES.items():  # each pass that ran, with its counts per graph (0 too)
        counts = [(g, info[feature.key]) for g, info in m["recipe"].get("graphs", {}).items() if feature.key in info]
        if counts:
            typer.echo(f"feature     {name}: {', '.join(_count(g, c) for g, c in counts)}")
        reason = slow_int8_math() if counts and name == "int8-matmul" else None
        if reason:
            typer.echo(f"            note: {reason}")
    for msg in compatibility(b):
        typer.echo(f"warning: {msg}", err=True)
    typer.echo(f"verified    {_verification_line(m['verification'])}")
    d = m["defaults"]
    typer.echo(f"defaults    n={d['n']} mu={d['mu']:g} lr={d['lr']:g} tau={d['tau']} nu={d['nu']:g} "
               f"PUTS=[{d['t_low']},{d['t_high']}) steps={d['steps']}"
               + "".join(f" {k}={d[k]}" for k in ("search_init", "guide_vocab", "guide_encoder", "guide_alpha") if k in d))
    typer.echo(f"all {sum(1 for _ in b.files())} files match their sha256")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _param(name: str):
    """``personalize``'s parameter ``name`` as typer wants it, from the table personalize-many shares."""
    p = BY_NAME[name]
    if p.argument:
        return typer.Argument(p.default, help=p.help)
    return typer.Option(p.default, *p.decls, help=p.help)


@app.command()
@cli_errors
def personalize(
    bundle: Path = _param("bundle"),
    images: Path = _param("images"),
    token: str = _param("token"),
    init: str = _param("init"),
    out: Path = _param("out"),
    steps: Optional[str] = _param("steps"),
    search_init: Optional[bool] = _param("search_init"),
    seed: int = _param("seed"),
    captions: Optional[Path] = _param("captions"),
    templates: str = _param("templates"),
    device: str = _param("device"),
    strict: bool = _param("strict"),
    batched: Optional[bool] = _param("batched"),
    n: Optional[int] = _param("n"),
    mu: Optional[float] = _param("mu"),
    lr: Optional[float] = _param("lr"),
    tau: Optional[int] = _param("tau"),
    nu: Optional[float] = _param("nu"),
    t_low: Optional[int] = _param("t_low"),
    t_high: Optional[int] = _param("t_high"),
    guide_vocab: Optional[int] = _param("guide_vocab"),
    guide_encoder: Optional[int] = _param("guide_encoder"),
    no_subspace: bool = _param("no_subspace"),
    no_puts: bool = _param("no_puts"),
    checkpoint_every: int = _param("checkpoint_every"),
    checkpoint: Optional[Path] = _param("checkpoint"),
    resume: bool = _param("resume"),
    fmt: str = _param("fmt"),
    init_embedding: Optional[Path] = _param("init_embedding"),
    preview_every: int = _param("preview_every"),
    log_jsonl: Optional[Path] = _param("log_jsonl"),
    quiet: bool = _param("quiet"),
    force: bool = _param("force"),
) -> None:
    """Learn a token for the concept in IMAGES with forward passes only (device)."""
    from .embeddings import check_embedding_output
    from .files import exclusive_lock
    from .profiles import resolve_profile
    from .runtime.checkpoint import check_checkpoint_path
    from .runtime.checks import check_seed
    from .runtime.personalize import NonFiniteLoss, Personalizer, Settings
    from .runtime.runlog import check_log_path

    check_embedding_output(out, token, fmt)
    check_seed(seed)
    if checkpoint_every < 0 or preview_every < 0:
        raise UserError("--checkpoint-every and --preview-every count steps: 0 (off) or more")
    ckpt = checkpoint or out.with_name(out.name + ".ckpt")
    _check_personalize_paths(bundle, out, ckpt, log_jsonl)
    wanted = _parse_steps(steps)
    profile = resolve_profile(device)
    _restart_for(profile)
    with contextlib.ExitStack() as locks:
        for path in (out, ckpt, log_jsonl):
            if path is not None:
                locks.enter_context(exclusive_lock(path))
        # What would be written over is checked before anything loads; train() checks it all again,
        # with what only the loaded run knows (whose checkpoint and embedding these are).
        if os.path.lexists(out) and not force and not resume:
            raise UserError(f"{out} exists; pass --force to replace it")
        check_checkpoint_path(ckpt, resume)
        if log_jsonl:
            check_log_path(log_jsonl, resume, force)
        settings = Settings(n=n, mu=mu, lr=lr, tau=tau, nu=nu, t_low=t_low, t_high=t_high, subspace=not no_subspace,
                            puts=not no_puts, seed=seed, templates=templates, batch_perturbations=batched,
                            search_init=search_init, guide_vocab=guide_vocab,
                            guide_encoder=guide_encoder)
        warn = lambda msg: typer.echo(f"warning: {msg}", err=True)  # noqa: E731
        start = None
        if init_embedding is not None:
            from .embeddings import load_embedding

            _, start, _ = load_embedding(init_embedding)  # SDXL's {clip_l, clip_g} or [k, d]; the bundle checks which
            if len(start["clip_l"] if isinstance(start, dict) else start) != 1:
                raise UserError(f"{init_embedding}: --init-embedding needs a single-vector embedding")
        p = Personalizer(bundle, images, token, init, settings=settings, captions=captions, profile=profile, strict=strict,
                         warn=warn, init_embedding=start)
        total, stop = _step_budget(wanted, p.bundle.manifest["defaults"]["steps"])
        try:
            with _StepBar(total, quiet) as bar:
                p.train(total, stop=stop, checkpoint=ckpt, checkpoint_every=checkpoint_every, resume=resume,
                        force=force, log=log_jsonl, preview_every=preview_every,
                        preview_prefix=ckpt.with_name(f"{out.stem}-preview"), on_step=bar,
                        say=lambda msg: typer.echo(msg, err=True), out=out, fmt=fmt)
        except NonFiniteLoss as e:
            raise UserError(f"{e}; {out} was not written") from None
        except KeyboardInterrupt:
            _err(f"interrupted at step {p.step_index}; checkpoint saved to {ckpt}; continue with --resume")
            raise typer.Exit(130) from None
    if p.stopped_early:
        typer.echo(f"--steps auto: held-out probes stopped improving at step {p.step_index} (best at {stop.best_step})", err=True)
    typer.echo(f"learned {token} in {p.step_index} steps (final loss {p.last_loss:.4f}, peak RSS {_peak_rss_mb():.0f} MB): {out}")


def _parse_steps(value: str | None) -> int | str | None:
    """``--steps``: a count, "auto", or None (the bundle's default); checked before anything loads."""
    if value is None:
        return None
    if value.strip().lower() == "auto":
        return "auto"
    try:
        total = int(value)
    except ValueError:
        raise UserError(f"--steps wants a whole number or 'auto', got {value!r}") from None
    if not 1 <= total <= 10**9:
        raise UserError(f"--steps must be from 1 to 10**9, got {total}")
    return total


def _step_budget(wanted: int | str | None, default: int):
    """The run's step count, and for "auto" the Plateau rule that may stop it sooner (capped at
    the bundle's default)."""
    from .runtime.stopping import auto_rule

    if wanted == "auto":
        return default, auto_rule(default)
    return (default if wanted is None else wanted), None


class _StepBar:
    """personalize's progress bar, drawn at the first step: a resumed run's starts where its
    checkpoint was, so its rate counts only this run's steps."""

    def __init__(self, total: int, quiet: bool):
        self.total, self.quiet = total, quiet
        self.bar = None
        self.ema: float | None = None

    def __call__(self, rec) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=rec.step, disable=self.quiet, unit="step", dynamic_ncols=True)
        loss = float(rec.losses[0])
        self.ema = loss if self.ema is None else 0.98 * self.ema + 0.02 * loss
        self.bar.set_postfix(loss=f"{self.ema:.4f}", t=rec.t, peak=f"{_peak_rss_mb():.0f}MB", refresh=False)
        self.bar.update(1)

    def __enter__(self) -> _StepBar:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _check_personalize_paths(bundle: Path, out: Path, ckpt: Path, log: Path | None) -> None:
    """Refuse output paths that are folders, that name one file twice, or that lie in the bundle."""
    seen: dict[Path, str] = {}
    for opt, path in {"--out": out, "--checkpoint": ckpt, "--log-jsonl": log}.items():
        if path is None:
            continue
        if path.is_dir():
            raise UserError(f"{opt} {path} is a folder; it must name a file")
        real = path.resolve()
        if real in seen:
            raise UserError(f"{seen[real]} and {opt} name the same file ({path})")
        if bundle.is_dir() and real.is_relative_to(bundle.resolve()):
            raise UserError(f"{opt} {path} is inside the bundle folder {bundle}; write outside it")
        seen[real] = opt
    for opt, path in {"--out": out, "--checkpoint": ckpt, "--log-jsonl": log}.items():
        if path is not None:
            if not path.parent.is_dir():
                raise UserError(f"{opt}: folder does not exist: {path.parent}")
            check_writable(path, opt)


@app.command()
@cli_errors
def generate(
    bundle: Path = typer.Argument(..., help="bundle folder"),
    prompt: str = typer.Option(..., help="text prompt; learned tokens may appear in it"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for the PNGs and grid.png"),
    embedding: list[Path] = typer.Option([], help="learned embedding file (ours, diffusers or A1111); repeatable"),
    n: int = typer.Option(1, "-n", help="number of images"),
    steps: int = typer.Option(30, help="sampling steps"),
    guidance: float = typer.Option(7.5, help="classifier-free guidance scale (1 = off)"),
    seed: int = typer.Option(0, help="random seed"),
    negative_prompt: str = typer.Option("", help="what the image should not show"),
    scheduler: str = typer.Option("ddim", help="ddim | dpm++ | euler"),
    tile: Optional[int] = typer.Option(None, help="decode in tiles of this many latent pixels (bounds decoder memory)"),
    device: str = typer.Option("auto", help="device profile (see `zoodip-edge devices`)"),
    strict: bool = typer.Option(False, "--strict", help="refuse to fall back to CPU"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    force: bool = typer.Option(False, "--force", help="replace images in OUT that have the names this run writes (NNNN-NN.png, grid.png)"),
) -> None:
    """Generate images with the bundle, optionally using learned tokens (device)."""
    from tqdm import tqdm

    from .bundle import load_bundle
    from .files import save_image
    from .profiles import resolve_profile
    from .runtime.generate import Generator, check_generation, grid
    from .runtime.memory import check_generation_memory

    check_generation(n=n, steps=steps, guidance=guidance, seed=seed, tile=tile)  # the model's own limits are checked again
    names = [f"{seed:04d}-{i:02d}.png" for i in range(n)] + ["grid.png"]
    _check_out_folder(out, [out / name for name in names], force)
    profile = resolve_profile(device)
    _restart_for(profile)
    b = load_bundle(bundle)
    check_generation_memory(b, profile, tile)  # over the profile's budget: one line now, not the OS's kill later
    warn = lambda msg: typer.echo(f"warning: {msg}", err=True)  # noqa: E731
    g = Generator(b, profile=profile, strict=strict, warn=warn, embeddings=embedding)
    bar = tqdm(total=steps, disable=quiet, unit="step")
    images = g.generate(prompt, negative_prompt=negative_prompt, n=n, steps=steps, guidance=guidance, seed=seed,
                        scheduler=scheduler, tile=tile, progress=lambda i, total: bar.update(1))
    bar.close()
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that fails leaves no folder behind
    for name, im in zip(names, [*images, grid(images)]):
        save_image(im, out / name)
    typer.echo(f"wrote {len(images)} image(s) and grid.png to {out}")


@app.command()
@cli_errors
def convert(
    src: Path = typer.Argument(..., help="embedding file: ours, diffusers (.safetensors/.bin) or A1111 (.pt/.safetensors)"),
    dst: Path = typer.Argument(..., help="output .safetensors file"),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers | a1111"),
    token: Optional[str] = typer.Option(None, help="token name (default: the one in SRC, or its file name)"),
    force: bool = typer.Option(False, "--force", help="replace DST if it exists"),
) -> None:
    """Convert a learned embedding between diffusers and A1111 layouts (no pickle code is run)."""
    from .embeddings import check_embedding_output, load_embedding, save_embedding

    check_embedding_output(dst, token or "token", fmt)  # the format and name, before anything is read
    if not force:
        refuse_existing([dst])
    check_writable(dst)
    name, vec, meta = load_embedding(src)
    tok = token or name or src.stem
    save_embedding(dst, tok, vec, {k: v for k, v in meta.items() if k != "name"}, fmt=fmt)
    typer.echo(f"wrote {tok} ({fmt}) to {dst}")


@app.command()
@cli_errors
def evaluate(
    references: Path = typer.Option(..., help="folder of the reference photos"),
    class_word: str = typer.Option(..., help="class noun of the concept, e.g. dog (CLIP-T reads prompts with it)"),
    token: str = typer.Option(..., help="the learned token as it appears in prompts"),
    out: Path = typer.Option(..., "--out", "-o", help="folder for results.json, results.md (and generated images)"),
    generated: Optional[Path] = typer.Option(None, help="score this folder of generated images (with --prompt)"),
    prompt: Optional[str] = typer.Option(None, help="the prompt the --generated images were made with"),
    run_all: bool = typer.Option(False, "--all", help="generate with the DreamBooth prompt list, then score"),
    bundle: Optional[Path] = typer.Option(None, help="--all: bundle to generate with"),
    embedding: Optional[Path] = typer.Option(None, help="--all: the learned embedding"),
    kind: str = typer.Option("object", help="--all: DreamBooth prompt list, object | live"),
    n: int = typer.Option(5, "-n", help="--all: images per prompt (the paper: 5)"),
    steps: int = typer.Option(30, help="--all: sampling steps"),
    guidance: float = typer.Option(7.5, help="--all: guidance scale"),
    scheduler: str = typer.Option("ddim", help="--all: ddim | dpm++ | euler"),
    device: str = typer.Option("auto", help="--all: device profile"),
    clip: str = typer.Option("openai/clip-vit-base-patch32", help="CLIP model id or local folder (CLIP-I, CLIP-T)"),
    dino: str = typer.Option("facebook/dinov2-base", help="DINOv2 model id or local folder (DINO)"),
    force: bool = typer.Option(False, "--force", help="replace results.json, results.md and (with --all) images/ in OUT"),
) -> None:
    """Score generated images with the paper's CLIP-I, CLIP-T and DINO (needs the eval extra)."""
    from .evaluate import check_model_source, evaluate_images, load_image_folder, write_report
    from .files import save_image

    if run_all == (generated is not None):
        raise UserError("give either --generated with --prompt, or --all with --bundle and --embedding")
    if generated is not None and not prompt:
        raise UserError("--generated needs --prompt (the prompt those images were made with)")
    if run_all and (bundle is None or embedding is None):
        raise UserError("--all needs --bundle and --embedding")
    _check_out_folder(out, [out / "results.json", out / "results.md", *([out / "images"] if run_all else [])], force)
    refs = load_image_folder(references)
    gen = {prompt: load_image_folder(generated)} if generated is not None else {}
    check_model_source("CLIP", clip)  # before any generation: a model that cannot load fails first
    check_model_source("DINO", dino)
    if generated is None:
        from .prompts import dreambooth_prompts
        from .runtime.generate import Generator

        g = Generator(bundle, profile=device, embeddings=[embedding],
                      warn=lambda msg: typer.echo(f"warning: {msg}", err=True))
        prompts = dreambooth_prompts(kind, token, class_word)
        with typer.progressbar(prompts, label="generating") as bar:
            for i, p in enumerate(bar):
                gen[p] = g.generate(p, n=n, steps=steps, guidance=guidance, scheduler=scheduler, seed=i)
        for i, images in enumerate(gen.values()):  # written once all are made: a failed run leaves none
            folder = out / "images" / f"{i:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            for j, im in enumerate(images):
                save_image(im, folder / f"{j:02d}.png")
    results = evaluate_images(gen, refs, class_word=class_word, token=token, clip=clip, dino=dino)
    out.mkdir(parents=True, exist_ok=True)
    write_report(results, out / "results.json", out / "results.md")
    typer.echo(f"CLIP-I {results['clip_i']:.3f}  CLIP-T {results['clip_t']:.3f}  DINO {results['dino']:.3f}  "
               f"({results['num_generated']} images, {results['num_prompts']} prompts): {out / 'results.md'}")


@app.command()
@cli_errors
def devices() -> None:
    """List device profiles and what this machine's ONNX Runtime offers."""
    from .runtime.sessions import available_providers, devices_report

    typer.echo(f"onnxruntime providers here: {', '.join(available_providers())}")
    for r in devices_report():
        mark = "*" if r.get("auto") else " "
        state = "usable" if r.get("usable") else "not usable here"
        typer.echo(f"{mark} {r['name']:<18} {state:<16} {r['description']}")
    typer.echo("* = what --device auto picks")


@app.command()
@cli_errors
def demo(
    out: Path = typer.Option(Path("zoodip-demo"), "--out", "-o", help="folder for the photos, images, curve and embedding"),
    steps: Optional[int] = typer.Option(None, help="personalization steps (default: the toy bundle's, 1000 for toy-64)"),
    seed: int = typer.Option(0, help="random seed"),
    concept: str = typer.Option("purple-ring", help="color-shape of the toy world to learn, e.g. green-triangle"),
    model: str = typer.Option("toy-64", help="toy-64 (64-d tokens, under a minute) | toy-768 (CLIP-L-wide 768-d tokens)"),
    images: int = typer.Option(16, help="images generated before and after (the concept score's sample)"),
    force: bool = typer.Option(False, "--force", help="replace an earlier demo's outputs in OUT (learned_embeds.safetensors, grid.png, loss.png, photos/)"),
) -> None:
    """Learn a concept on the shipped toy model and show it: grid.png, loss.png, one line of figures."""
    from tqdm import tqdm

    from .demo import check_out, demo_steps, parse_concept, run_demo
    from .runtime.checks import check_seed
    from .toy import toy_model

    check_out(out, force)  # before the progress bar draws
    check_writable(out / "grid.png")
    check_seed(seed)
    parse_concept(concept, toy_model(model).world)
    steps = steps if steps is not None else demo_steps(model)
    if steps < 1:
        raise UserError("--steps must be at least 1")
    if not 1 <= images <= 256:
        raise UserError(f"--images must be between 1 and 256, got {images}")
    with tqdm(total=steps, desc="ZOODiP", unit="step", leave=False) as bar:
        r = run_demo(out, steps=steps, seed=seed, concept=concept, images=images,
                     say=lambda msg: tqdm.write(f"[demo] {msg}", file=sys.stderr),
                     progress=lambda i, n: bar.update(i - bar.n), force=force, model=model)
    b, a = r["score_before"], r["score_after"]
    if r["gap_closed"] == r["gap_closed"]:  # not NaN: the words explain the photos better than the initializer
        held = f"held-out loss closed {100 * r['gap_closed']:.0f}% of the gap to the words '{r['words']}'"
    else:
        held = f"held-out loss {r['loss_init']:.4f} -> {r['loss_after']:.4f} (the words '{r['words']}': {r['loss_words']:.4f})"
    typer.echo(f"{r['token']} ({r['concept']}): concept score {b['score']:.2f} -> {a['score']:.2f} "
               f"(color {b['color']:.2f} -> {a['color']:.2f}, shape {b['shape']:.2f} -> {a['shape']:.2f}; "
               f"{images} images read from pixels); {held} in {r['steps']} steps ({r['seconds']:.0f} s); {r['grid']}")


@app.command("personalize-many")
@cli_errors
def personalize_many(
    jobs: Path = typer.Argument(..., help="job file: one JSON object of personalize's options per line (docs/many.md)"),
    out: Path = typer.Option(..., "--out", "-o", help="run folder: ledger.jsonl, report.md/.csv, jobs/NAME/; rerun to resume"),
    ray: Optional[str] = typer.Option(None, "--ray", help="run on Ray: local (start one here) | auto | ADDRESS (needs the cluster extra)"),
    parallel: Optional[int] = typer.Option(None, "--jobs", "-j", help="local pool: jobs at once (default: what cores and the memory budget allow)"),
    threads: Optional[int] = typer.Option(None, "--threads-per-job", help="ONNX Runtime threads per job (default: cores / jobs at once; Ray: 1)"),
    retries: int = typer.Option(2, help="times a job whose process or worker died is retried (it resumes from its checkpoint)"),
    images: int = typer.Option(4, help="images per job in its grid.png (and scored with --evaluate)"),
    evaluate: bool = typer.Option(False, "--evaluate", help="score each job: the toy world's concept score (job key 'concept') or "
                                  "`zoodip-edge evaluate --all` (job key 'class_word', eval extra)"),
    job_memory_mb: Optional[int] = typer.Option(None, help="memory planned per job (default: personalize's memory estimate for the largest job)"),
    device: str = typer.Option("auto", help="profile whose memory budget caps the local pool"),
) -> None:
    """Run many personalize jobs: a local pool or Ray, resumable, with one report (docs/many.md)."""
    from .many import personalize_many as run

    outcomes, md, plan = run(jobs, out, ray=ray, parallel=parallel, threads=threads, retries=retries, images=images,
                             evaluate=evaluate, job_memory_mb=job_memory_mb, device=device, argv=sys.argv[1:],
                             say=lambda msg: typer.echo(f"[many] {msg}", err=True))
    states = [o["state"] for o in outcomes.values()]
    if "interrupted" in states:
        _err(f"interrupted; rerun the same command to resume (report so far: {md})")
        raise typer.Exit(130)
    failed = states.count("failed")
    typer.echo(f"{len(plan.jobs) - failed} of {len(plan.jobs)} jobs done, {failed} failed: {md}")
    if failed:
        raise typer.Exit(1)


def main() -> None:
    global _MAIN
    _MAIN = True
    app()


if __name__ == "__main__":
    main()
