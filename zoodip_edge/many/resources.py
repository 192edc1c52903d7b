"""What a job needs and gets: memory planned from its bundle, cores, the pool's size, and its
device profile with the thread count fixed."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..profiles import parse_profile, resolve_profile
from .jobs import Job


def bundle_bytes(bundle: str) -> int | None:
    """The bundle's size from its manifest (what a job maps into memory), or None if unreadable."""
    try:
        m = json.loads((Path(bundle) / "manifest.json").read_text())
        return sum(int(c["bytes"]) + sum(int(e["bytes"]) for e in c.get("external_data", []))
                   for c in m["components"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
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


def plan_pool(jobs: int, cpus: int, budget_mb: int | None, per_job_mb: int, want: int | None,
              threads: int | None) -> tuple[int, int]:
    """(jobs at once, threads per job) on this machine: no more jobs than cores or the memory
    budget allow (a profile without a budget: cores only), and the cores split evenly between them."""
    if want is None:
        by_memory = jobs if budget_mb is None else budget_mb // max(per_job_mb, 1)
        want = max(1, min(jobs, cpus // (threads or 1), by_memory))
    return want, threads or max(1, cpus // want)


def uses_gpu(spec: str) -> bool:
    return resolve_profile(spec).provider_names[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def profile_with_threads(spec: str, threads: int) -> str:
    """The TOML of device profile ``spec`` with ``intra_op_threads = threads``; checked by reading it back."""
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
