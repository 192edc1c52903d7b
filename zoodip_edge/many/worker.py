"""One job to the end in a worker's care (a local pool thread or a Ray task): personalize in its
own process, retried and resumed from the job's checkpoint, then the report step."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..bundle import sha256_file
from ..runtime.checkpoint import checkpoint_identity
from .records import append_jsonl, read_jsonl, write_json

_LEARNED = re.compile(r"learned .* in (\d+) steps \(final loss ([-+0-9.eEnaif]+), peak RSS (\d+) MB\)")


def manifest_sha256(bundle: str) -> str | None:
    """What the driver records and each worker compares: every node must see the same bundle."""
    try:
        return hashlib.sha256((Path(bundle) / "manifest.json").read_bytes()).hexdigest()
    except OSError:
        return None


def die_with_parent() -> None:
    """Runs in the child before exec: a killed worker (or driver) takes its personalize with it,
    so no orphan keeps computing or holds the job's locks (Linux; elsewhere a no-op)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def error_line(text: str) -> str:
    """The reason a command gave: its last ``error:`` line, else its last line."""
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
    if spec.get("bundle_sha256") and manifest_sha256(spec["bundle"]) != spec["bundle_sha256"]:
        return {"state": "failed", "reason": f"the bundle at {spec['bundle']} on {socket.gethostname()} is not the "
                                             "driver's (its manifest differs); every node must see the same bundle"}
    trained = _train(spec)
    if "state" in trained:
        return trained
    result: dict[str, Any] = {}
    if spec.get("finish") is not None:
        cmd = [sys.executable, "-m", "zoodip_edge.many", "finish", json.dumps(spec["finish"])]
        r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=die_with_parent)
        if r.returncode != 0:
            return {"state": "failed", "reason": f"report step: {error_line(r.stderr)}", **trained}
        result = json.loads((d / "result.json").read_text())
    # seconds: this call's wall time on the worker (a Ray task's wait for resources is not in it)
    ended = [a for a in read_jsonl(d / "attempts.jsonl") if "exit" in a]  # every run's tries that ended
    return {"state": "done", **trained, **result, "seconds": round(time.time() - began, 3),
            "train_seconds": round(sum(a["seconds"] for a in ended), 3)}


def _train(spec: dict) -> dict:
    """personalize until it succeeds: its trained.json record, or the job's outcome (with "state")
    when it failed for good or was interrupted."""
    d, out = Path(spec["dir"]), Path(spec["out"])
    trained_file = d / "trained.json"
    trained = json.loads(trained_file.read_text()) if trained_file.is_file() else None
    if trained is not None and out.is_file() and sha256_file(out) == trained.get("sha256"):
        return trained
    # no record, or the embedding went missing or changed: personalize --resume writes it again
    attempts = [a for a in read_jsonl(d / "attempts.jsonl") if "resume" in a]  # each try's start record
    tries = 0
    while True:
        tries += 1
        code, stdout, stderr = _attempt(spec, d, len(attempts) + 1, attempts)
        if code == 0:
            m = _LEARNED.search(stdout)
            if not m:
                return {"state": "failed", "reason": f"personalize printed no result line: {error_line(stdout)}"}
            trained = {"steps": int(m.group(1)), "final_loss": float(m.group(2)), "peak_rss_mb": int(m.group(3)),
                       "sha256": sha256_file(out), "embedding": str(out)}
            write_json(trained_file, trained)
            return trained
        reason = error_line(stderr)
        if code == 2:
            return {"state": "failed", "reason": reason}
        if code == 130:
            return {"state": "interrupted", "reason": reason}
        if tries > spec.get("retries", 2):
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            return {"state": "failed", "reason": f"personalize {how} on each of {tries} tries; last: {reason}"}


def _attempt(spec: dict, d: Path, number: int, attempts: list[dict]) -> tuple[int, str, str]:
    """One personalize process (resuming when the job has a checkpoint), recorded in attempts.jsonl;
    returns its exit status, stdout and what it wrote to stderr."""
    resume = checkpoint_identity(d / "checkpoint.ckpt") is not None
    cmd = [sys.executable, "-m", "zoodip_edge.cli", "personalize", *spec["argv"], *(["--resume"] if resume else [])]
    start = time.time()
    with open(d / "personalize.log", "ab") as log:
        log.write(f"--- attempt {number} on {socket.gethostname()}: {' '.join(cmd[3:])}\n".encode())
        log.flush()
        offset = log.tell()
        # stderr straight to the log, so a killed try leaves what it said; stdout is the one result line
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, preexec_fn=die_with_parent)
        record = {"attempt": number, "host": socket.gethostname(), "worker_pid": os.getpid(),
                  "pid": child.pid, "resume": resume, "started": start}
        append_jsonl(d / "attempts.jsonl", record)
        stdout, _ = child.communicate()
        log.write(stdout)
    with open(d / "personalize.log", "rb") as log:
        log.seek(offset)
        stderr = log.read()
    record.update(ended=time.time(), seconds=round(time.time() - start, 3), exit=child.returncode)
    attempts.append(record)
    append_jsonl(d / "attempts.jsonl", {"attempt": record["attempt"], "ended": record["ended"],
                                         "seconds": record["seconds"], "exit": child.returncode})
    return child.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
