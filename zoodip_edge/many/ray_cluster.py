"""personalize-many on Ray: one Ray task per job, with the resources it declares.

Ray is an optional extra (``pip install "zoodip-edge[cluster]"``) and is imported here only,
when ``--ray`` is given: the device install never loads it.

Every node must see the bundle, the photos and the run folder at the same paths (a shared
filesystem): a task checks that the bundle's manifest there is the driver's before it starts,
and writes its checkpoint, log and embedding into the run folder, so a retry on another node
resumes from the same checkpoint.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from ..errors import UserError
from .jobs import Job
from .plan import Plan
from .resources import cpus_here
from .worker import run_job


def connect(address: str, cpus: int) -> bool:
    """Join the Ray instance ``address`` names ("local": start one on this machine with ``cpus``
    CPUs; "auto" or host:port: an existing cluster). Returns whether this call started Ray."""
    try:
        import ray
    except ImportError:
        raise UserError('--ray needs Ray: pip install "zoodip-edge[cluster]"') from None
    if ray.is_initialized():  # a caller (a notebook, a test) already joined one: use it
        return False
    if address not in ("local", "auto"):
        _reachable(address)
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "ERROR"}
    try:
        if address == "local":
            ray.init(address="local", num_cpus=cpus, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot join the Ray cluster at {address!r}: {msg[:300]}") from None
    return True


def _reachable(address: str, timeout: float = 5.0) -> None:
    """Refuse an address nothing answers at: ray.init retries an unreachable one without end."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"--ray {address!r}: want local, auto, HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach the Ray cluster at {hostport}: {e.strerror or e}") from None


def disconnect() -> None:
    """Leave (and stop, if this process started it) the Ray instance ``connect`` joined."""
    import ray

    ray.shutdown()


def run_on_ray(plan: Plan, specs: dict[str, dict], started: Callable[[Job], None],
               ended: Callable[[Job, dict, float], None], say: Callable[[str], None], address: str) -> None:
    """Submit every job left to do as a Ray task and record each as it ends. A task whose worker
    or node dies is retried by Ray (``plan.retries`` times) and resumes from its checkpoint."""
    import ray

    we_started = connect(address, cpus_here())
    try:
        remote = ray.remote(run_job)
        res = ray.cluster_resources()
        say(f"{len(plan.todo)} job(s) on Ray ({address}: {res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs); "
            f"each task declares {plan.threads} CPU(s), {plan.memory_mb} MB")
        running: dict[Any, tuple] = {}
        for job in plan.todo:
            spec = specs[job.name]
            ref = remote.options(num_cpus=plan.threads, num_gpus=1 if spec["gpu"] else 0,
                                 memory=plan.memory_mb * 2**20, max_retries=plan.retries,
                                 retry_exceptions=False, name=f"personalize:{job.name}").remote(spec)
            started(job)
            running[ref] = (job, time.time())
        interrupted = False
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                job, t0 = running.pop(ref)
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayError as e:  # the worker died more often than retries allow
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    outcome = {"state": "failed", "reason": f"{type(e).__name__}: {first[:300]}"}
                ended(job, outcome, time.time() - t0)
                if outcome["state"] == "interrupted" and not interrupted:
                    interrupted = True
                    for other in running:
                        ray.cancel(other)
    finally:
        if we_started:
            ray.shutdown()
