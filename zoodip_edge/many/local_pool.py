"""personalize-many on this machine: a pool of worker threads, each watching one job's processes."""

from __future__ import annotations

import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Callable

from .jobs import Job
from .plan import Plan
from .worker import run_job


def run_local(plan: Plan, specs: dict[str, dict], started: Callable[[Job], None],
              ended: Callable[[Job, dict, float], None], say: Callable[[str], None]) -> None:
    """Run every job left to do, ``plan.pool`` at once; after an interrupted job none is started."""
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
