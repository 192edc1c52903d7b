"""What a job needs and gets: memory planned from its bundle, cores, the pool's size, and its
device profile with the thread count fixed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from typing import Any

from ..errors import UserError
from ..profiles import parse_profile, resolve_profile
from .jobs import Job


def job_estimate_mb(job: Job, resident_sessions: dict[str, bool] | None = None) -> float | None:
    """What ``personalize`` estimates this job needs (runtime/memory.py) under the job's own device
    profile, with the preview decoder if it writes previews; None if its bundle or profile cannot
    be read (the job then fails with the reason). ``resident_sessions`` caches each profile's setting."""
    from ..bundle import load_bundle
    from ..runtime.memory import estimate_memory

    cache = {} if resident_sessions is None else resident_sessions
    device = str(job.options.get("device", "auto"))
    try:
        if device not in cache:  # "auto" asks ONNX Runtime (and maybe nvidia-smi): once per run, not per job
            cache[device] = resolve_profile(device).resident_sessions
        bundle = load_bundle(job.options["bundle"], verify=False, run=False)  # the manifest is all it reads
        return estimate_memory(bundle, cache[device], preview=bool(job.options.get("preview_every"))).total_mb
    except (UserError, KeyError, TypeError, ValueError):
        return None


def job_memory_mb(jobs: list[Job]) -> int:
    """Planning figure per job, in MB: the largest of the jobs' estimates (``job_estimate_mb``), the
    rule ``personalize`` checks a profile's memory_budget_mb with; BASE_MB when none can be read."""
    from ..runtime.memory import BASE_MB

    resident: dict[str, bool] = {}
    estimates = [e for e in (job_estimate_mb(j, resident) for j in jobs) if e is not None]
    return math.ceil(max(estimates, default=BASE_MB))


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
