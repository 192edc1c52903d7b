"""The ``zoodip-edge`` command: a thin layer over the Python API.

Every command turns a UserError into one line on stderr and exit status 2, and a failure inside
ONNX Runtime (e.g. the GPU out of memory) into one line and exit status 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Backpropagation-free personalization (ZOODiP) of INT8 Stable Diffusion on devices.")


def _err(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)


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
    recipe: str = typer.Option("int8-cpu", help="int8-cpu | int8-cpu-fast | int8-gpu | fp16 | fp32 | w8a8-dynamic, w8a8-static (experiments)"),
    resolution: Optional[int] = typer.Option(None, help="image size in pixels (default: the model's)"),
    force: bool = typer.Option(False, "--force", help="replace an existing output folder"),
    allow_unfaithful: bool = typer.Option(False, "--allow-unfaithful", help="export even if the ZO fidelity gate fails"),
    config: Optional[str] = typer.Option(None, help="diffusers config folder or hub id for a single-file checkpoint"),
) -> None:
    """Export a Stable Diffusion pipeline to a verified ONNX bundle (workstation)."""
    from .export import export_bundle

    manifest = export_bundle(model, out, recipe=recipe, resolution=resolution, force=force,
                             allow_unfaithful=allow_unfaithful, config=config,
                             progress=lambda msg: typer.echo(f"[export] {msg}", err=True))
    v = manifest["verification"]
    typer.echo(f"exported {manifest['family']} ({recipe}) to {out}: ZO fidelity pearson {v['zo_fidelity']['pearson']:.4f}, "
               f"conditioning kept {v['conditioning_sensitivity']['ratio']:.3f}")


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@app.command()
@cli_errors
def inspect(
    bundle: Path = typer.Argument(..., help="bundle folder"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Summarize a bundle and verify every file's hash."""
    from .bundle import load_bundle
    from .cpu import slow_int8_math

    b = load_bundle(bundle, verify=True)
    m = b.manifest
    if as_json:
        typer.echo(json.dumps(m, indent=2))
        return
    typer.echo(f"bundle      {bundle}  (format {m['format_version']}, manifest sha256 {b.manifest_sha256[:16]})")
    typer.echo(f"model       {m['family']} from {m['source'].get('model')} ({m['source'].get('kind')})")
    typer.echo(f"recipe      {m['recipe']['name']}: {m['recipe']['description']}")
    typer.echo(f"resolution  {m['resolution']} px, latents {m['latent_channels']}x{m['latent_size']}x{m['latent_size']}, "
               f"scale {m['latent_scale']}, prediction {m['scheduler'].get('prediction_type')}")
    for name, c in m["components"].items():
        size = c["bytes"] + sum(e["bytes"] for e in c.get("external_data", []))
        ins = ", ".join(f"{i['name']}{i['shape']}" for i in c["inputs"])
        typer.echo(f"{name:<12}{_mb(size):>10}  {ins}")
    for name, info in m["recipe"].get("graphs", {}).items():
        if "winograd_convs" in info:
            sizes = info["winograd_convs"]
            said = ", ".join(f"{n} at {k.removeprefix('Conv ')}" for k, n in sizes.items()) or "none at 16x16 or larger"
            typer.echo(f"winograd    {name}: {sum(sizes.values())} 3x3 convolutions rewritten ({said})")
        if info.get("shared_prefix_nodes"):
            typer.echo(f"prefix      {name}: {info['shared_prefix_nodes']} nodes run once for a batch of text conditions")
        if info.get("int8_matmul"):
            typer.echo(f"int8 math   {name}: {info['int8_matmul']} MatMuls compute in int8 (inputs rounded per block of 32)")
            reason = slow_int8_math()
            if reason:
                typer.echo(f"            note: {reason}")
    v = m["verification"]
    f = v["zo_fidelity"]
    step = f" (step {f['step_norm']:.2g})" if "step_norm" in f else " (unit step: exported before zoodip-edge measured training's step)"
    typer.echo(f"verified    ZO fidelity pearson {f['pearson']:.4f} at mu {f['mu']:g}{step}"
               f"{'' if f['passed'] else ' (FAILED: exported with --allow-unfaithful)'}; "
               f"conditioning kept {v['conditioning_sensitivity']['ratio']:.3f}; "
               f"text encoder max abs err {v['text_encoder_parity']['max_abs']:.2g}")
    d = m["defaults"]
    typer.echo(f"defaults    n={d['n']} mu={d['mu']:g} lr={d['lr']:g} tau={d['tau']} nu={d['nu']:g} "
               f"PUTS=[{d['t_low']},{d['t_high']}) steps={d['steps']}")
    typer.echo(f"all {sum(1 for _ in b.files())} files match their sha256")


class _JsonlLog:
    """Per-step records from which a run can be replayed (zoodip_edge.runtime.zo.replay)."""

    def __init__(self, path: Path, header: dict, resume_step: int | None):
        kept = []
        if resume_step is not None and path.exists():
            # drop records past the checkpoint: the resumed run writes those steps again
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec.get("type") == "start" or rec.get("step", 0) < resume_step:
                    kept.append(line)
        else:
            kept.append(json.dumps(header))
        path.write_text("".join(line + "\n" for line in kept))
        self.f = open(path, "a")

    def write(self, record) -> None:
        self.f.write(json.dumps({"type": "step", "step": record.step, "t": record.t, "noise_seed": record.noise_seed,
                                 "loss": float(record.losses[0]), "losses": record.losses.tolist(),
                                 "g": record.g.tolist()}) + "\n")
        self.f.flush()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@app.command()
@cli_errors
def personalize(
    bundle: Path = typer.Argument(..., help="bundle folder made by `zoodip-edge export`"),
    images: Path = typer.Argument(..., help="folder of 3-5 photos of the concept"),
    token: str = typer.Option(..., help="the new token, e.g. '<my-dog>'"),
    init: str = typer.Option(..., help="a one-token word to start from, e.g. 'dog'"),
    out: Path = typer.Option(..., "--out", "-o", help="learned embedding file (.safetensors)"),
    steps: Optional[int] = typer.Option(None, help="total optimization steps (default: the family's, 30000 for SD1.5)"),
    seed: int = typer.Option(0, help="random seed: same seed, same result"),
    captions: Optional[Path] = typer.Option(None, help="JSON mapping image file name -> caption with {} for the token"),
    templates: str = typer.Option("object", help="textual-inversion templates when no captions: object | style"),
    device: str = typer.Option("auto", help="auto | cpu | cpu-lowmem | cuda | cuda-lowvram | tensorrt | jetson-orin-nano | path/to/profile.toml"),
    strict: bool = typer.Option(False, "--strict", help="refuse to fall back to CPU when a requested provider is missing"),
    batched: Optional[bool] = typer.Option(None, "--batched/--sequential", help="run the n+1 perturbations as one batch or one by one (default: profile)"),
    n: Optional[int] = typer.Option(None, "--n", help="perturbations per step"),
    mu: Optional[float] = typer.Option(None, help="perturbation size"),
    lr: Optional[float] = typer.Option(None, help="ZOAdam learning rate"),
    tau: Optional[int] = typer.Option(None, help="Subspace Gradient buffer length"),
    nu: Optional[float] = typer.Option(None, help="Subspace Gradient variance threshold"),
    t_low: Optional[int] = typer.Option(None, help="PUTS lower timestep (inclusive)"),
    t_high: Optional[int] = typer.Option(None, help="PUTS upper timestep (exclusive)"),
    no_subspace: bool = typer.Option(False, "--no-subspace", help="ablation: disable the Subspace Gradient"),
    no_puts: bool = typer.Option(False, "--no-puts", help="ablation: sample t uniformly from all timesteps"),
    checkpoint_every: int = typer.Option(100, help="write a checkpoint every K steps (0: only at the end / on Ctrl-C)"),
    checkpoint: Optional[Path] = typer.Option(None, help="checkpoint file (default: OUT with .ckpt appended)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the checkpoint"),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers | a1111"),
    init_embedding: Optional[Path] = typer.Option(None, help="start from an existing embedding file (continue training)"),
    preview_every: int = typer.Option(0, help="write a preview image beside the checkpoint every K steps (0: off)"),
    log_jsonl: Optional[Path] = typer.Option(None, help="write one JSON record per step (replayable)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
    force: bool = typer.Option(False, "--force", help="overwrite OUT if it exists"),
) -> None:
    """Learn a token for the concept in IMAGES with forward passes only (device)."""
    from tqdm import tqdm

    from .profiles import resolve_profile
    from .runtime.personalize import Personalizer, Settings

    if out.exists() and not force and not resume:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise UserError(f"output folder does not exist: {out.parent}")
    if fmt not in ("diffusers", "a1111"):
        raise UserError(f"unknown --format {fmt!r} (diffusers or a1111)")
    ckpt = checkpoint or out.with_name(out.name + ".ckpt")
    if resume and not ckpt.is_file():
        raise UserError(f"--resume: no checkpoint at {ckpt}")
    profile = resolve_profile(device)
    _restart_for(profile)
    settings = Settings(n=n, mu=mu, lr=lr, tau=tau, nu=nu, t_low=t_low, t_high=t_high, subspace=not no_subspace,
                        puts=not no_puts, seed=seed, templates=templates, batch_perturbations=batched)
    warn = lambda msg: typer.echo(f"warning: {msg}", err=True)  # noqa: E731
    start = None
    if init_embedding is not None:
        from .embeddings import load_embedding

        _, start, _ = load_embedding(init_embedding)
        if isinstance(start, dict) or len(start) != 1:
            raise UserError(f"{init_embedding}: --init-embedding needs a single-vector SD1/SD2 embedding")
    p = Personalizer(bundle, images, token, init, settings=settings, captions=captions, profile=profile, strict=strict,
                     warn=warn, init_embedding=start)
    total = steps if steps is not None else p.bundle.manifest["defaults"]["steps"]
    if total < 1:
        raise UserError("--steps must be at least 1")
    if resume:
        p.load_checkpoint(ckpt)
    log = None
    if log_jsonl:
        header = {"type": "start", "token": token, "init": init, "seed": seed, "bundle": p.bundle.manifest_sha256,
                  "config": dataclasses.asdict(p.config), "theta0": p.theta0.tolist()}
        log = _JsonlLog(log_jsonl, header, p.step_index if resume else None)
    bar = tqdm(total=total, initial=p.step_index, disable=quiet, unit="step", dynamic_ncols=True)
    ema = None
    try:
        for rec in p.run(total):
            loss = float(rec.losses[0])
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            if log:
                log.write(rec)
            bar.set_postfix(loss=f"{ema:.4f}", t=rec.t, peak=f"{_peak_rss_mb():.0f}MB", refresh=False)
            bar.update(1)
            if checkpoint_every and p.step_index % checkpoint_every == 0:
                p.save_checkpoint(ckpt)
            if preview_every and p.step_index % preview_every == 0:
                p.preview(ckpt.with_name(f"{out.stem}-preview-{p.step_index:06d}.png"))
    except KeyboardInterrupt:
        bar.close()
        p.save_checkpoint(ckpt)
        _err(f"interrupted at step {p.step_index}; checkpoint saved to {ckpt}; continue with --resume")
        raise typer.Exit(130) from None
    bar.close()
    p.save_checkpoint(ckpt)
    p.save(out, fmt=fmt)
    typer.echo(f"learned {token} in {p.step_index} steps (final loss {p.last_loss:.4f}, peak RSS {_peak_rss_mb():.0f} MB): {out}")


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
) -> None:
    """Generate images with the bundle, optionally using learned tokens (device)."""
    from tqdm import tqdm

    from .profiles import resolve_profile
    from .runtime.generate import Generator, grid

    profile = resolve_profile(device)
    _restart_for(profile)
    warn = lambda msg: typer.echo(f"warning: {msg}", err=True)  # noqa: E731
    g = Generator(bundle, profile=profile, strict=strict, warn=warn, embeddings=embedding)
    out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=steps, disable=quiet, unit="step")
    images = g.generate(prompt, negative_prompt=negative_prompt, n=n, steps=steps, guidance=guidance, seed=seed,
                        scheduler=scheduler, tile=tile, progress=lambda i, total: bar.update(1))
    bar.close()
    for i, im in enumerate(images):
        im.save(out / f"{seed:04d}-{i:02d}.png")
    grid(images).save(out / "grid.png")
    typer.echo(f"wrote {len(images)} image(s) and grid.png to {out}")


@app.command()
@cli_errors
def convert(
    src: Path = typer.Argument(..., help="embedding file: ours, diffusers (.safetensors/.bin) or A1111 (.pt/.safetensors)"),
    dst: Path = typer.Argument(..., help="output .safetensors file"),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers | a1111"),
    token: Optional[str] = typer.Option(None, help="token name (default: the one in SRC, or its file name)"),
    force: bool = typer.Option(False, "--force", help="overwrite DST"),
) -> None:
    """Convert a learned embedding between diffusers and A1111 layouts (no pickle code is run)."""
    from .embeddings import load_embedding, save_embedding

    if dst.exists() and not force:
        raise UserError(f"{dst} exists; pass --force to overwrite it")
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
) -> None:
    """Score generated images with the paper's CLIP-I, CLIP-T and DINO (needs the eval extra)."""
    from .evaluate import evaluate_images, load_image_folder, write_report

    refs = load_image_folder(references)
    if run_all == (generated is not None):
        raise UserError("give either --generated with --prompt, or --all with --bundle and --embedding")
    if generated is not None:
        if not prompt:
            raise UserError("--generated needs --prompt (the prompt those images were made with)")
        gen = {prompt: load_image_folder(generated)}
    else:
        if bundle is None or embedding is None:
            raise UserError("--all needs --bundle and --embedding")
        from .prompts import dreambooth_prompts
        from .runtime.generate import Generator

        g = Generator(bundle, profile=device, embeddings=[embedding],
                      warn=lambda msg: typer.echo(f"warning: {msg}", err=True))
        gen = {}
        prompts = dreambooth_prompts(kind, token, class_word)
        with typer.progressbar(prompts, label="generating") as bar:
            for i, p in enumerate(bar):
                gen[p] = g.generate(p, n=n, steps=steps, guidance=guidance, scheduler=scheduler, seed=i)
                folder = out / "images" / f"{i:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                for j, im in enumerate(gen[p]):
                    im.save(folder / f"{j:02d}.png")
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
    steps: int = typer.Option(1000, help="personalization steps"),
    seed: int = typer.Option(0, help="random seed"),
    concept: str = typer.Option("purple-ring", help="color-shape of the toy world to learn, e.g. green-triangle"),
    images: int = typer.Option(16, help="images generated before and after (the concept score's sample)"),
) -> None:
    """Learn a concept on the shipped toy model and show it: grid.png, loss.png, one line of figures."""
    from tqdm import tqdm

    from .demo import run_demo

    with tqdm(total=steps, desc="ZOODiP", unit="step", leave=False) as bar:
        r = run_demo(out, steps=steps, seed=seed, concept=concept, images=images,
                     say=lambda msg: tqdm.write(f"[demo] {msg}", file=sys.stderr),
                     progress=lambda i, n: bar.update(i - bar.n))
    b, a = r["score_before"], r["score_after"]
    typer.echo(f"{r['token']} ({r['concept']}): concept score {b['score']:.2f} -> {a['score']:.2f} "
               f"(color {b['color']:.2f} -> {a['color']:.2f}, shape {b['shape']:.2f} -> {a['shape']:.2f}; "
               f"{images} images read from pixels); held-out loss closed {100 * r['gap_closed']:.0f}% of the gap "
               f"to the words '{r['concept']}' in {r['steps']} steps ({r['seconds']:.0f} s); {r['grid']}")


def main() -> None:
    global _MAIN
    _MAIN = True
    app()


if __name__ == "__main__":
    main()
