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

The modules, in the order a run uses them: ``jobs`` (the job file), ``plan`` (what is left to
do, threads and memory from ``resources``), ``driver`` (the command: the ledger in ``records``,
then ``local_pool`` or ``ray_cluster``), ``worker`` (one job's personalize processes), ``finish``
(a job's report step, ``python -m zoodip_edge.many finish``) and ``report``.
"""

from __future__ import annotations

from .driver import personalize_many, run_many
from .finish import finish_job
from .jobs import EXTRA_KEYS, NAME_RE, Job, read_jobs
from .plan import RUN_OUTPUTS, Plan, embedding_path, job_dir, job_spec, personalize_argv, prepare
from .records import Ledger, ledger_state, read_jsonl
from .report import COLUMNS, write_report
from .resources import cpus_here, job_estimate_mb, job_memory_mb, plan_pool, profile_with_threads, uses_gpu
from .worker import run_job

__all__ = [
    "COLUMNS", "EXTRA_KEYS", "NAME_RE", "RUN_OUTPUTS", "Job", "Ledger", "Plan", "cpus_here",
    "embedding_path", "finish_job", "job_dir", "job_estimate_mb", "job_memory_mb", "job_spec", "ledger_state", "personalize_argv",
    "personalize_many", "plan_pool", "prepare", "profile_with_threads", "read_jobs", "read_jsonl", "run_job",
    "run_many", "uses_gpu", "write_report",
]
