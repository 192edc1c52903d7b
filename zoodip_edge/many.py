"""``zoodip-edge personalize-many``: many personalize jobs from one JSON Lines file, resumable.

Each job runs as its own ``python -m zoodip_edge.cli personalize`` process with the job's
options, so a job gives the embedding that command gives, bit for bit, and a killed worker is
just a dead process: its retry passes ``--resume`` and continues from the job's checkpoint.

The run folder (``--out DIR``)::

    ledger.jsonl          one record per event: run start, job start, done, failed (attempts, timings, paths)
    report.md, report.csv one row per job
    jobs/NAME/            profile.toml (the thread count this job runs with), checkpoint.ckpt,
                          learned_embeds.safetensors (unless the job names its own out), personalize.log,
                          attempts.jsonl, trained.json, result.json, grid.png

The thread count is part of a job's numbers on the CPU EP (ONNX Runtime sums in a different
order with another count), so each job's count is fixed in its profile.toml when it first
starts and every retry or resume uses that file, on whichever machine it runs.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from .bundle import sha256_file
from .errors import UserError

# Options the runner sets itself: the checkpoint lives in the job folder, retries resume, and
# nothing it does replaces a file it did not write.
MANAGED = ("checkpoint", "resume", "force", "quiet", "log_jsonl")
# Keys of a job that are not personalize's: the job's name and what --evaluate scores it with.
EXTRA_KEYS = ("name", "concept", "class_word")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}")
JOB_FILES = ("profile.toml", "checkpoint.ckpt", "personalize.log", "attempts.jsonl", "trained.json",
             "result.json", "grid.png")
RUN_OUTPUTS = ("ledger.jsonl", "report.md", "report.csv", "jobs")

Say = Callable[[str], None]


# ------------------------------------------------------------------------- job file ----------

@dataclass(frozen=True)
class OptionSpec:
    """One personalize parameter as a job key: its CLI spelling and the JSON types it takes."""

    key: str
    flag: str | None  # None: a positional argument
    off_flag: str | None  # "--no-search-init" for a --x/--no-x option
    kind: str  # "path", "str", "int", "float", "bool"
    positional: int = -1


def personalize_options() -> dict[str, OptionSpec]:
    """The job keys, read from the ``personalize`` command itself so the two never drift apart."""
    import inspect
    import typing

    import typer.models

    from .cli import personalize

    hints = typing.get_type_hints(personalize)
    specs: dict[str, OptionSpec] = {}
    position = 0
    for name, param in inspect.signature(personalize).parameters.items():
        hint = hints[name]
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        kind = {Path: "path", str: "str", int: "int", float: "float", bool: "bool"}[base]
        info = param.default
        if isinstance(info, typer.models.ArgumentInfo):
            specs[name] = OptionSpec(name, None, None, kind, position)
            position += 1
            continue
        decls = [d for d in (info.param_decls or ()) if d.startswith("--")]
        flag = decls[0] if decls else "--" + name.replace("_", "-")
        on, _, off = flag.partition("/")
        key = on[2:].replace("-", "_")  # the option's own name: "format", not the parameter's "fmt"
        if key in MANAGED:
            continue
        specs[key] = OptionSpec(key, on, off or None, kind)
    return specs


@dataclass
class Job:
    """One personalize run: its name, where it came from, and its options (paths absolute)."""

    name: str
    line: int
    options: dict[str, Any]
    concept: str | None = None
    class_word: str | None = None

    def identity(self) -> str:
        """What the ledger compares across reruns: the same name must mean the same options."""
        return hashlib.sha256(json.dumps(self.options, sort_keys=True).encode()).hexdigest()[:16]


def _check_value(where: str, key: str, spec: OptionSpec, value: Any) -> Any:
    """JSON types per option; values personalize itself checks (ranges, paths) are left to it,
    so a bad value fails that job alone with personalize's own reason."""
    ok = {
        "path": isinstance(value, str) and value != "",
        "str": isinstance(value, str) or (key == "steps" and isinstance(value, int) and not isinstance(value, bool)),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[spec.kind]
    if not ok:
        want = {"path": "a path (string)", "str": "a string", "int": "a whole number", "float": "a number",
                "bool": "true or false"}[spec.kind]
        raise UserError(f"{where}: {key!r} must be {want}, not {json.dumps(value)}")
    return str(value) if spec.kind == "str" else value


def _resolve_path(base: Path, value: str) -> str:
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else (base / p).absolute())


def _looks_like_path(device: str) -> bool:
    return device.lower().endswith(".toml") or "/" in device or os.sep in device


def _grid_suffix(values: dict[str, Any]) -> str:
    return "-".join(f"{k}{_short(v)}" for k, v in values.items())


def _short(v: Any) -> str:
    s = format(v, "g") if isinstance(v, float) else str(v).lower() if isinstance(v, bool) else str(v)
    return re.sub(r"[^A-Za-z0-9.+=-]", "_", Path(s).name if "/" in s else s)


def read_jobs(path: Path) -> list[Job]:
    """Parse a job file: one JSON object per line, or a grid line that expands to many jobs.

    A job line holds personalize's argument and option names (``bundle``, ``images``, ``token``,
    ``init``, ``out``, ``steps``, ``seed``, ``lr`` ...); relative paths are relative to the job file.
    A grid line adds ``"grid": {"lr": [...], "seed": [...]}``: one job per combination, named
    ``NAME-lr0.01-seed1``. Blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"job file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read job file {path}: {getattr(e, 'strerror', None) or e}") from None
    specs = personalize_options()
    known = sorted([*specs, *EXTRA_KEYS, "grid"])
    base = path.resolve().parent
    jobs: list[Job] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: a job is a JSON object, not {type(rec).__name__}")
        rec = {str(k).replace("-", "_"): v for k, v in rec.items()}
        for key in rec:
            if key in MANAGED:
                raise UserError(f"{where}: {key!r} is set by personalize-many (each job has its own folder)")
            if key not in specs and key not in EXTRA_KEYS and key != "grid":
                raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        grid = rec.pop("grid", None)
        axes: list[tuple[str, list]] = []
        if grid is not None:
            if not isinstance(grid, dict) or not grid:
                raise UserError(f"{where}: 'grid' must be an object of lists, e.g. {{\"lr\": [0.01, 0.02]}}")
            for key, values in grid.items():
                key = str(key).replace("-", "_")
                if key not in specs or specs[key].kind == "path" and key != "images":
                    raise UserError(f"{where}: grid key {key!r} is not an option a sweep can vary")
                if key in rec:
                    raise UserError(f"{where}: {key!r} is both a fixed key and a grid key")
                if not isinstance(values, list) or not values:
                    raise UserError(f"{where}: grid {key!r} must be a non-empty list")
                axes.append((key, values))
        for key in ("bundle", "images", "token", "init"):
            if key not in rec and key not in dict(axes):
                raise UserError(f"{where}: missing {key!r} (every job needs bundle, images, token and init)")
        name = rec.pop("name", None)
        if name is not None and (not isinstance(name, str) or not NAME_RE.fullmatch(name)):
            raise UserError(f"{where}: 'name' must be letters, digits and . _ = + - (up to 128), not {json.dumps(name)}")
        extras = {k: rec.pop(k, None) for k in ("concept", "class_word")}
        for k, v in extras.items():
            if v is not None and not isinstance(v, str):
                raise UserError(f"{where}: {k!r} must be a string")
        combos = itertools.product(*[[(k, v) for v in vs] for k, vs in axes]) if axes else [()]
        for combo in combos:
            values = dict(combo)
            opts: dict[str, Any] = {}
            for key, value in {**rec, **values}.items():
                value = _check_value(where, key, specs[key], value)
                if specs[key].kind == "path" or (key == "device" and _looks_like_path(value)):
                    value = _resolve_path(base, value)
                opts[key] = value
            label = name or f"job{number}"
            if values:
                label = f"{label}-{_grid_suffix(values)}"
            jobs.append(Job(label, number, opts, **extras))
    if not jobs:
        raise UserError(f"{path} holds no jobs")
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.name in seen:
            raise UserError(f"{path}:{job.line}: job name {job.name!r} is also line {seen[job.name].line}'s; "
                            "give each job its own 'name'")
        seen[job.name] = job
    outs: dict[str, str] = {}
    for job in jobs:
        out = job.options.get("out")
        if out is not None:
            if out in outs:
                raise UserError(f"{path}:{job.line}: jobs {outs[out]!r} and {job.name!r} write the same out {out}")
            outs[out] = job.name
    return jobs


# ---------------------------------------------------------------------- job folders ----------

def job_dir(run: Path, job: Job) -> Path:
    return run / "jobs" / job.name


def embedding_path(run: Path, job: Job) -> Path:
    return Path(job.options["out"]) if "out" in job.options else job_dir(run, job) / "learned_embeds.safetensors"


def personalize_argv(job: Job, run: Path, specs: dict[str, OptionSpec]) -> list[str]:
    """The ``personalize`` arguments of ``job`` (without --resume), its profile being the job's own file."""
    d = job_dir(run, job)
    positional = sorted((s.positional, k) for k, s in specs.items() if s.flag is None)
    argv = [str(job.options[k]) for _, k in positional]
    for key, value in job.options.items():
        s = specs[key]
        if s.flag is None or key in ("out", "device"):
            continue
        if s.kind == "bool":
            if value:
                argv.append(s.flag)
            elif s.off_flag:
                argv.append(s.off_flag)
        else:
            argv += [s.flag, str(value)]
    argv += ["--out", str(embedding_path(run, job)), "--checkpoint", str(d / "checkpoint.ckpt"),
             "--device", str(d / "profile.toml"), "--quiet"]
    return argv


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON's escapes are TOML basic-string escapes
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v).__name__)


def profile_with_threads(spec: str, threads: int) -> str:
    """The TOML of device profile ``spec`` with ``intra_op_threads = threads``; checked by reading it back."""
    from .profiles import parse_profile, resolve_profile

    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python < 3.11
        import tomli as tomllib

    prof = dataclasses.replace(resolve_profile(spec), intra_op_threads=threads)
    lines = [f"# {spec} ({prof.source or prof.name}) with a fixed thread count, written by personalize-many:",
             "# this job's numbers on the CPU EP depend on it, so retries and resumes use this file."]
    for f in dataclasses.fields(prof):
        v = getattr(prof, f.name)
        if f.name in ("providers", "session_config", "source") or v is None:
            continue
        lines.append(f"{f.name} = {_toml_value(v)}")
    if prof.session_config:
        lines += ["", "[session_config]", *(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in prof.session_config.items())]
    for pname, opts in prof.providers:
        lines += ["", "[[providers]]", f"name = {json.dumps(pname)}", f"options = {_toml_value(dict(opts))}"]
    text = "\n".join(lines) + "\n"
    if parse_profile(tomllib.loads(text), "written profile") != prof:
        raise UserError(f"device profile {spec!r} cannot be copied with a fixed thread count")
    return text


def uses_gpu(spec: str) -> bool:
    from .profiles import resolve_profile

    return resolve_profile(spec).provider_names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def bundle_bytes(bundle: str) -> int | None:
    """The bundle's size from its manifest (what a job maps into memory), or None if unreadable."""
    try:
        m = json.loads((Path(bundle) / "manifest.json").read_text())
        return sum(int(c["bytes"]) + sum(int(e["bytes"]) for e in c.get("external_data", []))
                   for c in m["components"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def manifestsha256_file(bundle: str) -> str | None:
    try:
        return hashlib.sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def job_memory_mb(jobs: list[Job]) -> int:
    """Planning figure per job: 1.5x the largest bundle plus 300 MB for Python and ONNX Runtime.
    Measured peaks: SD1.5 int8-cpu 1.43 GB (docs/performance.md), toy-64 about 115 MB."""
    sizes = [bundle_bytes(j.options["bundle"]) or 0 for j in jobs]
    return int(1.5 * max(sizes, default=0) / 2**20) + 300


def cpus_here() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def plan_pool(jobs: int, cpus: int, budget_mb: int, per_job_mb: int, want: int | None,
              threads: int | None) -> tuple[int, int]:
    """(jobs at once, threads per job) on this machine: no more jobs than cores or the memory
    budget allow, and the cores split evenly between them."""
    if want is None:
        want = max(1, min(jobs, cpus // (threads or 1), budget_mb // max(per_job_mb, 1)))
    return want, threads or max(1, cpus // want)


# ---------------------------------------------------------------------------- worker ----------

def _die_with_parent() -> None:
    """Runs in the child before exec: a killed worker (or driver) takes its personalize with it,
    so no orphan keeps computing or holds the job's locks (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file up to its first torn line (a kill mid-write tears the last)."""
    from .runtime.runlog import read_records

    return [rec for _, rec in read_records(path)]


_LEARNED = re.compile(r"learned .* in (\d+) steps \(final loss ([-+0-9.eEnaif]+), peak RSS (\d+) MB\)")


def _error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    return (errors[-1].removeprefix("error:").strip() if errors else lines[-1] if lines else "no output")[:500]


def run_job(spec: dict) -> dict:
    """Run one job to the end in this process's care: personalize (resuming from the job's
    checkpoint when there is one, retrying a killed or crashed process), then the report step.

    ``spec`` is plain JSON (it crosses to Ray workers): name, dir, argv, out, bundle_sha256,
    retries, finish. Returns the job's outcome: state "done", "failed" (with a reason) or
    "interrupted". Permanent failures (personalize's own refusals, exit status 2) are not retried.
    """
    began = time.time()
    d = Path(spec["dir"])
    out = Path(spec["out"])
    if spec.get("bundle_sha256") and manifestsha256_file(spec["bundle"]) != spec["bundle_sha256"]:
        return {"state": "failed", "reason": f"the bundle at {spec['bundle']} on {socket.gethostname()} is not the "
                                             "driver's (its manifest differs); every node must see the same bundle"}
    trained_file = d / "trained.json"
    trained = json.loads(trained_file.read_text()) if trained_file.is_file() else None
    if trained is not None and not (out.is_file() and sha256_file(out) == trained.get("sha256")):
        trained = None  # the embedding went missing or changed: personalize --resume writes it again
    attempts = [a for a in read_jsonl(d / "attempts.jsonl") if "resume" in a]  # each try's start record
    tries = 0
    while trained is None:
        tries += 1
        ckpt = d / "checkpoint.ckpt"
        from .runtime.checkpoint import checkpoint_identity

        resume = checkpoint_identity(ckpt) is not None
        cmd = [sys.executable, "-m", "zoodip_edge.cli", "personalize", *spec["argv"], *(["--resume"] if resume else [])]
        start = time.time()
        with open(d / "personalize.log", "ab") as log:
            log.write(f"--- attempt {len(attempts) + 1} on {socket.gethostname()}: {' '.join(cmd[3:])}\n".encode())
            log.flush()
            offset = log.tell()
            # stderr straight to the log, so a killed try leaves what it said; stdout is the one result line
            child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, preexec_fn=_die_with_parent)
            record = {"attempt": len(attempts) + 1, "host": socket.gethostname(), "worker_pid": os.getpid(),
                      "pid": child.pid, "resume": resume, "started": start}
            _append_jsonl(d / "attempts.jsonl", record)
            stdout, _ = child.communicate()
            log.write(stdout)
        with open(d / "personalize.log", "rb") as log:
            log.seek(offset)
            stderr = log.read()
        record.update(ended=time.time(), seconds=round(time.time() - start, 3), exit=child.returncode)
        attempts.append(record)
        _append_jsonl(d / "attempts.jsonl", {"attempt": record["attempt"], "ended": record["ended"],
                                              "seconds": record["seconds"], "exit": child.returncode})
        text = stdout.decode(errors="replace")
        if child.returncode == 0:
            m = _LEARNED.search(text)
            if not m:
                return {"state": "failed", "reason": f"personalize printed no result line: {_error_line(text)}"}
            trained = {"steps": int(m.group(1)), "final_loss": float(m.group(2)), "peak_rss_mb": int(m.group(3)),
                       "sha256": sha256_file(out), "embedding": str(out)}
            _write_json(trained_file, trained)
            break
        reason = _error_line(stderr.decode(errors="replace"))
        if child.returncode == 2:
            return {"state": "failed", "reason": reason}
        if child.returncode == 130:
            return {"state": "interrupted", "reason": reason}
        if tries > spec.get("retries", 2):
            how = f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit status {child.returncode}"
            return {"state": "failed", "reason": f"personalize {how} on each of {tries} tries; last: {reason}"}
    finish = spec.get("finish")
    result: dict[str, Any] = {}
    if finish is not None:
        cmd = [sys.executable, "-m", "zoodip_edge.many", "finish", json.dumps(finish)]
        r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_die_with_parent)
        if r.returncode != 0:
            return {"state": "failed", "reason": f"report step: {_error_line(r.stderr)}", **trained}
        result = json.loads((d / "result.json").read_text())
    # seconds: this call's wall time on the worker (a Ray task's wait for resources is not in it)
    ended = [a for a in read_jsonl(d / "attempts.jsonl") if "exit" in a]  # every run's tries that ended
    return {"state": "done", **trained, **result, "seconds": round(time.time() - began, 3),
            "train_seconds": round(sum(a["seconds"] for a in ended), 3)}


def _write_json(path: Path, data: dict) -> None:
    from .files import write_atomic

    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


# ------------------------------------------------------------------------ report step ----------

def finish_job(spec: dict) -> dict:
    """Held-out loss of the learned token, a grid image (training photos over images made with
    the token), and with ``evaluate`` the concept score (toy world) or ``zoodip-edge evaluate``."""
    import numpy as np
    from PIL import Image, ImageDraw

    from .demo import generate_with
    from .embeddings import load_embedding
    from .runtime.images import load_images
    from .runtime.personalize import Personalizer, Settings
    from .runtime.stopping import probe_set

    o = spec["options"]
    d = Path(spec["dir"])
    keys = ("n", "mu", "lr", "tau", "nu", "t_low", "t_high", "seed", "templates")
    settings = Settings(**{k: o[k] for k in keys if k in o}, subspace=not o.get("no_subspace", False),
                        puts=not o.get("no_puts", False), batch_perturbations=o.get("batched"))
    p = Personalizer(o["bundle"], o["images"], o["token"], o["init"], settings=settings, captions=o.get("captions"),
                     profile=str(d / "profile.toml"))
    _, theta, _ = load_embedding(spec["out"])
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    # The demo's held-out probes, spread over this run's PUTS range: the same for every job of a sweep.
    probes = probe_set(p.config.t_low, p.config.t_high, 16, 1000)
    result: dict[str, Any] = {"held_out_loss": p.held_out_loss(theta, probes),
                              "held_out_loss_init": p.held_out_loss(p.theta0, probes)}
    images = generate_with(p, theta, spec["images"], seed=0)
    reference = [Image.fromarray(((im.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255).astype(np.uint8))
                 for _, im in load_images(o["images"], p.bundle.manifest["resolution"])]
    side = max(96, images[0].width)
    cols = max(len(images), len(reference))
    grid = Image.new("RGB", (70 + cols * (side + 2), 2 * (side + 2)), "white")
    draw = ImageDraw.Draw(grid)
    for r, (label, row) in enumerate((("photos", reference), (o["token"], images))):
        draw.text((4, r * (side + 2) + side // 2 - 5), label[:10], fill="black")
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((side, side), Image.NEAREST), (70 + c * (side + 2), r * (side + 2)))
    grid.save(d / "grid.png")
    result["grid"] = str(d / "grid.png")
    if spec.get("evaluate"):
        result.update(_evaluate(spec, images))
    _write_json(d / "result.json", result)
    return result


def _evaluate(spec: dict, images: list) -> dict:
    o = spec["options"]
    if spec.get("concept"):
        from .demo import parse_concept
        from .toy import shipped_path, toy_model
        from .toy.score import concept_score

        world = toy_model("toy-768").world if Path(o["bundle"]).resolve() == shipped_path("bundle-768").resolve() \
            else toy_model("toy-64").world
        color, shape = parse_concept(spec["concept"], world)
        return {f"concept_{k}": v for k, v in concept_score(images, color, shape, world).items()}
    if spec.get("class_word"):
        folder = Path(spec["dir"]) / "evaluate"
        cmd = [sys.executable, "-m", "zoodip_edge.cli", "evaluate", "--all", "--references", o["images"],
               "--class-word", spec["class_word"], "--token", o["token"], "--out", str(folder),
               "--bundle", o["bundle"], "--embedding", spec["out"], "--device", str(Path(spec["dir"]) / "profile.toml"),
               "--force"]
        r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_die_with_parent)
        if r.returncode != 0:
            raise UserError(f"zoodip-edge evaluate: {_error_line(r.stderr)}")
        res = json.loads((folder / "results.json").read_text())
        return {k: res[k] for k in ("clip_i", "clip_t", "dino") if k in res}
    return {}


# ---------------------------------------------------------------------------- driver ----------

@dataclass
class Plan:
    jobs: list[Job]
    run: Path
    specs: dict[str, OptionSpec]
    threads: int
    retries: int
    images: int
    evaluate: bool
    memory_mb: int
    pool: int = 0  # local jobs at once (0 with Ray: the cluster's resources decide)
    todo: list[Job] = field(default_factory=list)
    finished: dict[str, dict] = field(default_factory=dict)


def ledger_state(run: Path) -> dict[str, dict]:
    """Each job's last ledger record (its identity from its first start)."""
    state: dict[str, dict] = {}
    for rec in read_jsonl(run / "ledger.jsonl"):
        name = rec.get("job")
        if not name:
            continue
        last = state.setdefault(name, {})
        identity = last.get("identity") or rec.get("identity")
        last.clear()
        last.update(rec, identity=identity)
    return state


def prepare(job_file: Path, out: Path, *, threads: int | None, want_jobs: int | None, retries: int,
            images: int, evaluate: bool, job_memory: int | None, ray: bool, device_budget: str = "auto") -> Plan:
    """Read the jobs, check the run folder, decide threads, and list what is left to do."""
    from .profiles import resolve_profile

    jobs = read_jobs(job_file)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"{out} is not a folder")
    ledger = out / "ledger.jsonl"
    if out.is_dir() and not ledger.is_file():
        there = [out / n for n in RUN_OUTPUTS if os.path.lexists(out / n)]
        if there:
            raise UserError(f"{there[0]} exists but {out} has no ledger.jsonl: it is not a personalize-many run "
                            "folder; choose another --out")
    state = ledger_state(out)
    for job in jobs:
        rec = state.get(job.name)
        if rec and rec.get("identity") and rec["identity"] != job.identity():
            raise UserError(f"job {job.name!r} has other options than the one {ledger} recorded; "
                            "a rerun must use the same job file (or choose another --out)")
    memory = job_memory or job_memory_mb(jobs)
    cpus = cpus_here()
    budget = resolve_profile(device_budget).memory_budget_mb
    if ray:
        pool, per = 0, threads or 1
    else:
        pool, per = plan_pool(len(jobs), cpus, budget, memory, want_jobs, threads)
    plan = Plan(jobs, out, personalize_options(), per, retries, images, evaluate, memory, pool)
    for job in jobs:
        rec = state.get(job.name, {})
        d = job_dir(out, job)
        if rec.get("event") == "done" and _outputs_intact(d, rec):
            plan.finished[job.name] = rec
        else:
            plan.todo.append(job)
    return plan


def _outputs_intact(d: Path, rec: dict) -> bool:
    emb = Path(rec.get("embedding", ""))
    return emb.is_file() and rec.get("sha256") == sha256_file(emb) and (d / "result.json").is_file()


def job_spec(plan: Plan, job: Job) -> dict:
    """What a worker needs, as JSON; writes the job's folder and fixed-thread profile once."""
    d = job_dir(plan.run, job)
    d.mkdir(parents=True, exist_ok=True)
    profile = d / "profile.toml"
    if not profile.is_file():  # a retry or rerun keeps the first start's thread count
        _write_text(profile, profile_with_threads(job.options.get("device", "auto"), plan.threads))
    finish = {"dir": str(d), "options": job.options, "out": str(embedding_path(plan.run, job)),
              "images": plan.images, "evaluate": plan.evaluate, "concept": job.concept, "class_word": job.class_word}
    return {"name": job.name, "dir": str(d), "argv": personalize_argv(job, plan.run, plan.specs),
            "out": str(embedding_path(plan.run, job)), "bundle": job.options["bundle"],
            "bundle_sha256": manifestsha256_file(job.options["bundle"]), "retries": plan.retries, "finish": finish,
            "gpu": uses_gpu(str(profile))}


def _write_text(path: Path, text: str) -> None:
    from .files import write_atomic

    write_atomic(path, text.encode())


class Ledger:
    """The run's JSONL ledger: appended by the driver alone, each record flushed to disk."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record: Any) -> None:
        _append_jsonl(self.path, {"time": round(time.time(), 3), **record})


def run_many(plan: Plan, ledger: Ledger, say: Say, ray_address: str | None = None) -> dict[str, dict]:
    """Run every job left to do on the local pool or Ray; returns each job's outcome by name."""
    outcomes: dict[str, dict] = {}
    total, done = len(plan.jobs), len(plan.finished)
    failed = 0

    def started(job: Job) -> None:
        ledger.write(job=job.name, event="start", identity=job.identity(), line=job.line, threads=plan.threads)

    def ended(job: Job, outcome: dict, seconds: float) -> None:
        nonlocal done, failed
        d = job_dir(plan.run, job)
        attempts = [a for a in read_jsonl(d / "attempts.jsonl") if "exit" in a]
        outcome = {"seconds": round(seconds, 3), **outcome}
        outcomes[job.name] = outcome
        ledger.write(job=job.name, event=outcome["state"] if outcome["state"] != "done" else "done",
                     identity=job.identity(), attempts=len(attempts),
                     exits=[a["exit"] for a in attempts], **{k: v for k, v in outcome.items() if k != "state"})
        done += outcome["state"] == "done"
        failed += outcome["state"] == "failed"
        what = (f"done in {outcome['seconds']:.1f} s, held-out loss {outcome.get('held_out_loss', float('nan')):.4f}"
                if outcome["state"] == "done" else f"{outcome['state']}: {outcome.get('reason', '')}")
        say(f"{done}/{total} done, {failed} failed: {job.name} {what}")

    if plan.finished:
        say(f"{len(plan.finished)} of {total} jobs finished in an earlier run: skipped")
    if not plan.todo:
        return outcomes
    specs = {job.name: job_spec(plan, job) for job in plan.todo}
    if ray_address is None:
        _run_local(plan, specs, started, ended, say)
    else:
        from .cluster import run_on_ray

        run_on_ray(plan, specs, started, ended, say, ray_address)
    return outcomes


def _run_local(plan: Plan, specs: dict, started, ended, say: Say) -> None:
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    pool = plan.pool
    say(f"{len(plan.todo)} job(s) on a local pool: {pool} at once, {plan.threads} thread(s) each, "
        f"{plan.memory_mb} MB planned per job")
    with ThreadPoolExecutor(max_workers=pool) as ex:
        running = {}
        queue = list(plan.todo)
        interrupted = False

        def submit(job: Job) -> None:
            started(job)
            running[ex.submit(run_job, specs[job.name])] = (job, time.time())

        for job in queue[:pool]:
            submit(job)
        queue = queue[pool:]
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                job, t0 = running.pop(fut)
                try:
                    outcome = fut.result()
                except Exception as e:  # noqa: BLE001 - one job's fault must not stop the others
                    outcome = {"state": "failed", "reason": f"{type(e).__name__}: {e}"}
                interrupted |= outcome["state"] == "interrupted"
                ended(job, outcome, time.time() - t0)
                if queue and not interrupted:
                    submit(queue.pop(0))


def personalize_many(job_file: Path, out: Path, *, ray: str | None = None, parallel: int | None = None,
                     threads: int | None = None, retries: int = 2, images: int = 4, evaluate: bool = False,
                     job_memory_mb: int | None = None, device: str = "auto", say: Say = lambda s: None,
                     argv: Iterable[str] = ()) -> tuple[dict[str, dict], Path, Plan]:
    """Run (or resume) the jobs of ``job_file`` into the run folder ``out``; returns each job's
    outcome this time (jobs finished earlier are not in it), the report's path and the plan."""
    from .files import exclusive_lock

    for opt, v, low in (("--jobs", parallel, 1), ("--threads-per-job", threads, 1), ("--retries", retries, 0),
                        ("--images", images, 1), ("--job-memory-mb", job_memory_mb, 1)):
        if v is not None and v < low:
            raise UserError(f"{opt} must be at least {low}")
    if ray is not None and not ray.strip():
        raise UserError("--ray wants local, auto or a cluster address")
    if ray is not None and parallel is not None:
        raise UserError("--jobs sets the local pool; with --ray the cluster's resources decide")
    if ray is not None:
        import importlib.util

        if importlib.util.find_spec("ray") is None:  # before anything is written
            raise UserError('--ray needs Ray: pip install "zoodip-edge[cluster]"')
    out = Path(out).absolute()
    plan = prepare(Path(job_file), out, threads=threads, want_jobs=parallel, retries=retries, images=images,
                   evaluate=evaluate, job_memory=job_memory_mb, ray=ray is not None, device_budget=device)
    started_ray = False
    if ray is not None and plan.todo:  # joined before anything is written: an unreachable cluster leaves no folder
        from .cluster import connect

        started_ray = connect(ray, cpus_here())
    try:
        out.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(out / "ledger.jsonl"):
            ledger = Ledger(out / "ledger.jsonl")
            ledger.write(event="run", argv=list(argv), mode=f"ray {ray}" if ray else "local", jobs=len(plan.jobs),
                         todo=len(plan.todo), threads_per_job=plan.threads)
            try:
                outcomes = run_many(plan, ledger, say, ray)
            finally:
                md, _ = write_report(plan)
    finally:
        if started_ray:
            import ray as ray_module

            ray_module.shutdown()
    return outcomes, md, plan


# ---------------------------------------------------------------------------- report ----------

COLUMNS = ("job", "state", "attempts", "steps", "seconds", "peak_rss_mb", "final_loss", "held_out_loss_init",
           "held_out_loss", "concept_score", "concept_color", "concept_shape", "clip_i", "clip_t", "dino",
           "embedding", "grid", "reason")


def write_report(plan: Plan) -> tuple[Path, Path]:
    """report.md and report.csv: every job of the job file, with its last ledger record."""
    state = ledger_state(plan.run)
    rows = []
    for job in plan.jobs:
        rec = state.get(job.name, {})
        row = {"job": job.name, "state": rec.get("event", "not run"), **{k: rec.get(k) for k in COLUMNS[2:]}}
        if row["state"] == "start":
            row["state"] = "unfinished"
        rows.append(row)
    used = [c for c in COLUMNS if c in ("job", "state") or any(r.get(c) not in (None, "") for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(used)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r[c] for c in used])
    md_cols = [c for c in used if c not in ("embedding",)]

    def cell(c: str, v: Any) -> str:
        if v is None:
            return ""
        if c == "grid":
            return f"![{Path(v).parent.name}]({os.path.relpath(v, plan.run)})"
        if isinstance(v, float):
            return f"{v:.4f}" if c != "seconds" else f"{v:.1f}"
        return str(v).replace("|", "\\|")

    done = sum(r["state"] == "done" for r in rows)
    lines = ["# personalize-many report", "",
             f"{done} of {len(rows)} jobs done; {sum(r['state'] == 'failed' for r in rows)} failed. "
             f"Held-out loss: the mean diffusion loss over 16 fixed (t, noise) probes in the job's PUTS range "
             f"(`_init`: the initializer word's token). Seconds: wall time of the job, training and report step.", "",
             "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in md_cols) + " |" for r in rows]
    md, cv = plan.run / "report.md", plan.run / "report.csv"
    _write_text(md, "\n".join(lines) + "\n")
    _write_text(cv, buf.getvalue())
    return md, cv


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "finish":
        try:
            finish_job(json.loads(sys.argv[2]))
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    else:
        print("usage: python -m zoodip_edge.many finish SPEC_JSON (used by personalize-many)", file=sys.stderr)
        sys.exit(2)
