"""The job file: JSON Lines of personalize options, where a grid line expands to many jobs."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..personalize_options import MANAGED, Param, job_keys

# Keys of a job that are not personalize's: the job's name and what --evaluate scores it with.
EXTRA_KEYS = ("name", "concept", "class_word")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=+-]{0,127}")


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
    keys = job_keys()
    base = path.resolve().parent
    jobs: list[Job] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line and not line.startswith("#"):
            jobs += _jobs_of_line(line, f"{path}:{number}", number, keys, base)
    if not jobs:
        raise UserError(f"{path} holds no jobs")
    _check_distinct(path, jobs)
    return jobs


def _jobs_of_line(line: str, where: str, number: int, keys: dict[str, Param], base: Path) -> list[Job]:
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
        if key not in keys and key not in EXTRA_KEYS and key != "grid":
            known = sorted([*keys, *EXTRA_KEYS, "grid"])
            raise UserError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
    axes = _grid_axes(where, rec.pop("grid", None), rec, keys)
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
    jobs = []
    for combo in itertools.product(*[[(k, v) for v in vs] for k, vs in axes]) if axes else [()]:
        values = dict(combo)
        opts: dict[str, Any] = {}
        for key, value in {**rec, **values}.items():
            value = _check_value(where, key, keys[key], value)
            if keys[key].kind == "path" or (key == "device" and _looks_like_path(value)):
                value = _resolve_path(base, value)
            opts[key] = value
        label = name or f"job{number}"
        if values:
            label = f"{label}-{_grid_suffix(values)}"
        jobs.append(Job(label, number, opts, **extras))
    return jobs


def _grid_axes(where: str, grid: Any, rec: dict[str, Any], keys: dict[str, Param]) -> list[tuple[str, list]]:
    """The (key, values) a grid line varies, checked: options only, no path but ``images``."""
    axes: list[tuple[str, list]] = []
    if grid is None:
        return axes
    if not isinstance(grid, dict) or not grid:
        raise UserError(f"{where}: 'grid' must be an object of lists, e.g. {{\"lr\": [0.01, 0.02]}}")
    for key, values in grid.items():
        key = str(key).replace("-", "_")
        if key not in keys or keys[key].kind == "path" and key != "images":
            raise UserError(f"{where}: grid key {key!r} is not an option a sweep can vary")
        if key in rec:
            raise UserError(f"{where}: {key!r} is both a fixed key and a grid key")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: grid {key!r} must be a non-empty list")
        axes.append((key, values))
    return axes


def _check_distinct(path: Path, jobs: list[Job]) -> None:
    """Each job has its own name (its folder) and its own ``out``."""
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


def _check_value(where: str, key: str, param: Param, value: Any) -> Any:
    """JSON types per option; values personalize itself checks (ranges, paths) are left to it,
    so a bad value fails that job alone with personalize's own reason."""
    ok = {
        "path": isinstance(value, str) and value != "",
        "str": isinstance(value, str) or (key == "steps" and isinstance(value, int) and not isinstance(value, bool)),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
    }[param.kind]
    if not ok:
        want = {"path": "a path (string)", "str": "a string", "int": "a whole number", "float": "a number",
                "bool": "true or false"}[param.kind]
        raise UserError(f"{where}: {key!r} must be {want}, not {json.dumps(value)}")
    return str(value) if param.kind == "str" else value


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
