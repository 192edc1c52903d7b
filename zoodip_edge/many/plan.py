"""Planning a run: the jobs left to do, threads and memory per job, and what each worker gets."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import sha256_file
from ..errors import UserError
from ..personalize_options import Param, job_keys
from ..profiles import resolve_profile
from .jobs import Job, read_jobs
from .records import ledger_state, write_text
from .resources import cpus_here, job_memory_mb, plan_pool, profile_with_threads, uses_gpu
from .worker import manifest_sha256

RUN_OUTPUTS = ("ledger.jsonl", "report.md", "report.csv", "jobs")


@dataclass
class Plan:
    jobs: list[Job]
    run: Path
    specs: dict[str, Param]  # the job keys, as job_keys() gives them
    threads: int
    retries: int
    images: int
    evaluate: bool
    memory_mb: int
    pool: int = 0  # local jobs at once (0 with Ray: the cluster's resources decide)
    todo: list[Job] = field(default_factory=list)
    finished: dict[str, dict] = field(default_factory=dict)


def job_dir(run: Path, job: Job) -> Path:
    return run / "jobs" / job.name


def embedding_path(run: Path, job: Job) -> Path:
    return Path(job.options["out"]) if "out" in job.options else job_dir(run, job) / "learned_embeds.safetensors"


def prepare(job_file: Path, out: Path, *, threads: int | None, want_jobs: int | None, retries: int,
            images: int, evaluate: bool, job_memory: int | None, ray: bool, device_budget: str = "auto") -> Plan:
    """Read the jobs, check the run folder, decide threads, and list what is left to do."""
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
    plan = Plan(jobs, out, job_keys(), per, retries, images, evaluate, memory, pool)
    for job in jobs:
        rec = state.get(job.name, {})
        if rec.get("event") == "done" and _outputs_intact(job_dir(out, job), rec):
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
        write_text(profile, profile_with_threads(job.options.get("device", "auto"), plan.threads))
    finish = {"dir": str(d), "options": job.options, "out": str(embedding_path(plan.run, job)),
              "images": plan.images, "evaluate": plan.evaluate, "concept": job.concept, "class_word": job.class_word}
    return {"name": job.name, "dir": str(d), "argv": personalize_argv(job, plan.run, plan.specs),
            "out": str(embedding_path(plan.run, job)), "bundle": job.options["bundle"],
            "bundle_sha256": manifest_sha256(job.options["bundle"]), "retries": plan.retries, "finish": finish,
            "gpu": uses_gpu(str(profile))}


def personalize_argv(job: Job, run: Path, specs: dict[str, Param]) -> list[str]:
    """The ``personalize`` arguments of ``job`` (without --resume), its profile being the job's own file."""
    d = job_dir(run, job)
    argv = [str(job.options[k]) for k, s in specs.items() if s.argument]  # the table's order is the command's
    for key, value in job.options.items():
        s = specs[key]
        if s.argument or key in ("out", "device"):
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
