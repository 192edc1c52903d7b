"""The driver: checks the command's values, plans the run, runs it on the local pool or Ray
while it keeps the ledger, and writes the report."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Iterable

from ..errors import UserError
from ..files import exclusive_lock
from .jobs import Job
from .local_pool import run_local
from .plan import Plan, job_dir, job_spec, prepare
from .ray_cluster import connect, disconnect, run_on_ray  # these import Ray when called: the device install has none
from .records import Ledger, read_jsonl
from .report import write_report
from .resources import cpus_here

Say = Callable[[str], None]


def personalize_many(job_file: Path, out: Path, *, ray: str | None = None, parallel: int | None = None,
                     threads: int | None = None, retries: int = 2, images: int = 4, evaluate: bool = False,
                     job_memory_mb: int | None = None, device: str = "auto", say: Say = lambda s: None,
                     argv: Iterable[str] = ()) -> tuple[dict[str, dict], Path, Plan]:
    """Run (or resume) the jobs of ``job_file`` into the run folder ``out``; returns each job's
    outcome this time (jobs finished earlier are not in it), the report's path and the plan."""
    for opt, v, low in (("--jobs", parallel, 1), ("--threads-per-job", threads, 1), ("--retries", retries, 0),
                        ("--images", images, 1), ("--job-memory-mb", job_memory_mb, 1)):
        if v is not None and v < low:
            raise UserError(f"{opt} must be at least {low}")
    if ray is not None and not ray.strip():
        raise UserError("--ray wants local, auto or a cluster address")
    if ray is not None and parallel is not None:
        raise UserError("--jobs sets the local pool; with --ray the cluster's resources decide")
    if ray is not None and importlib.util.find_spec("ray") is None:  # before anything is written
        raise UserError('--ray needs Ray: pip install "zoodip-edge[cluster]"')
    out = Path(out).absolute()
    plan = prepare(Path(job_file), out, threads=threads, want_jobs=parallel, retries=retries, images=images,
                   evaluate=evaluate, job_memory=job_memory_mb, ray=ray is not None, device_budget=device)
    started_ray = False
    if ray is not None and plan.todo:  # joined before anything is written: an unreachable cluster leaves no folder
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
            disconnect()
    return outcomes, md, plan


def run_many(plan: Plan, ledger: Ledger, say: Say, ray_address: str | None = None) -> dict[str, dict]:
    """Run every job left to do on the local pool or Ray; returns each job's outcome by name."""
    outcomes: dict[str, dict] = {}
    total, done = len(plan.jobs), len(plan.finished)
    failed = 0

    def started(job: Job) -> None:
        ledger.write(job=job.name, event="start", identity=job.identity(), line=job.line, threads=plan.threads)

    def ended(job: Job, outcome: dict, seconds: float) -> None:
        nonlocal done, failed
        attempts = [a for a in read_jsonl(job_dir(plan.run, job) / "attempts.jsonl") if "exit" in a]
        outcome = {"seconds": round(seconds, 3), **outcome}
        outcomes[job.name] = outcome
        ledger.write(job=job.name, event=outcome["state"], identity=job.identity(), attempts=len(attempts),
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
        run_local(plan, specs, started, ended, say)
    else:
        run_on_ray(plan, specs, started, ended, say, ray_address)
    return outcomes
