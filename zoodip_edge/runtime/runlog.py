"""The per-step JSONL log of a training run: a start record, then one record per step, from which
the run can be replayed (zo.replay) without any model.

A resumed run keeps the records before its checkpoint's step and writes the later ones again; a
log that lacks some of those records (its end torn by a kill after the checkpoint) is refused
rather than continued with a gap.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_atomic
from .zo import StepRecord


def read_records(path: Path) -> list[tuple[str, dict]]:
    """(line, record) pairs up to the first unreadable line (a kill mid-write tears the last)."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    break
                if not isinstance(rec, dict) or not line.endswith("\n"):
                    break
                out.append((line.rstrip("\n"), rec))
    except (OSError, UnicodeDecodeError):
        pass
    return out


def check_log_path(path: Path, resume: bool, force: bool) -> None:
    """Before any work: an existing file is replaced only with ``force``, or continued on resume."""
    if os.path.lexists(path) and not force and not resume:
        raise UserError(f"{path} exists; pass --force to replace it")


class RunLog:
    """An open log; ``RunLog.open`` decides whether an existing file is kept, replaced or refused."""

    def __init__(self, path: Path, header: dict[str, Any], resume_step: int | None = None):
        kept = [json.dumps(header)]
        if resume_step is not None:
            kept += [line for line, rec in read_records(path)[1:] if rec.get("step", resume_step) < resume_step]
            if len(kept) - 1 != resume_step:  # records lost: a replay would skip steps
                raise UserError(f"{path} holds {len(kept) - 1} of the {resume_step} steps before the checkpoint (its end "
                                "was lost); it cannot be continued: resume with another --log-jsonl or without one")
        write_atomic(path, "".join(line + "\n" for line in kept).encode())
        self.f = open(path, "a", encoding="utf-8")

    @classmethod
    def open(cls, path: Path, header: dict[str, Any], *, step: int, resume: bool, force: bool) -> "RunLog":
        """This run's log at ``path``: continued at ``step`` on resume when its start record is
        ``header``; otherwise new (an existing other file only with ``force``)."""
        path = Path(path)
        check_log_path(path, resume, force)
        keep = resume and os.path.lexists(path) and cls.is_runs(path, header)
        if resume and os.path.lexists(path) and not keep and not force:
            raise UserError(f"{path} is not this run's log (its start record differs); pass --force to replace it")
        return cls(path, header, step if keep else None)

    @staticmethod
    def is_runs(path: Path, header: dict[str, Any]) -> bool:
        """Whether the log at ``path`` starts with ``header`` (was written by this run)."""
        if not Path(path).is_file():
            return False
        try:
            with open(path, "rb") as f:
                first = f.readline(1 << 24)  # a header is kilobytes; the file may be anything
            return json.loads(first) == json.loads(json.dumps(header))
        except (OSError, ValueError):
            return False

    def write(self, record: StepRecord) -> None:
        self.f.write(json.dumps({"type": "step", "step": record.step, "t": record.t, "noise_seed": record.noise_seed,
                                 "loss": float(record.losses[0]), "losses": record.losses.tolist(),
                                 "g": record.g.tolist()}) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
