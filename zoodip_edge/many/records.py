"""The run folder's records: the ledger, each job's attempts (JSON Lines) and its JSON results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from ..files import write_atomic
from ..runtime.runlog import read_records


def append_jsonl(path: Path, record: dict) -> None:
    """One record, on disk before this returns: a killed process leaves every record before it."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file up to its first torn line (a kill mid-write tears the last)."""
    return [rec for _, rec in read_records(path)]


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode())


def write_text(path: Path, text: str) -> None:
    write_atomic(path, text.encode())


class Ledger:
    """The run's JSONL ledger: appended by the driver alone, each record flushed to disk."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, **record: Any) -> None:
        append_jsonl(self.path, {"time": round(time.time(), 3), **record})


def ledger_state(run: Path) -> dict[str, dict]:
    """Each job's last ledger record (its identity from its first start)."""
    state: dict[str, dict] = {}
    for rec in read_jsonl(run / "ledger.jsonl"):
        name = rec.get("job")
        if not name:
            continue
        last = state.setdefault(name, {})
        identity = last.get("identity") or rec.get("identity")
        last.clear()
        last.update(rec, identity=identity)
    return state
