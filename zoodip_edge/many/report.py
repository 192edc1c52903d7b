"""The run's report: report.md and report.csv, one row per job of the job file."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from .plan import Plan
from .records import ledger_state, write_text

COLUMNS = ("job", "state", "attempts", "steps", "seconds", "peak_rss_mb", "final_loss", "held_out_loss_init",
           "held_out_loss", "concept_score", "concept_color", "concept_shape", "clip_i", "clip_t", "dino",
           "embedding", "grid", "reason")


def write_report(plan: Plan) -> tuple[Path, Path]:
    """report.md and report.csv: every job of the job file, with its last ledger record."""
    state = ledger_state(plan.run)
    rows = []
    for job in plan.jobs:
        rec = state.get(job.name, {})
        row = {"job": job.name, "state": rec.get("event", "not run"), **{k: rec.get(k) for k in COLUMNS[2:]}}
        if row["state"] == "start":
            row["state"] = "unfinished"
        rows.append(row)
    used = [c for c in COLUMNS if c in ("job", "state") or any(r.get(c) not in (None, "") for r in rows)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(used)
    for r in rows:
        w.writerow(["" if r.get(c) is None else r[c] for c in used])
    md_cols = [c for c in used if c not in ("embedding",)]

    def cell(c: str, v: Any) -> str:
        if v is None:
            return ""
        if c == "grid":
            return f"![{Path(v).parent.name}]({os.path.relpath(v, plan.run)})"
        if isinstance(v, float):
            return f"{v:.4f}" if c != "seconds" else f"{v:.1f}"
        return str(v).replace("|", "\\|")

    done = sum(r["state"] == "done" for r in rows)
    lines = ["# personalize-many report", "",
             f"{done} of {len(rows)} jobs done; {sum(r['state'] == 'failed' for r in rows)} failed. "
             f"Held-out loss: the mean diffusion loss over 16 fixed (t, noise) probes in the job's PUTS range "
             f"(`_init`: the initializer word's token). Seconds: wall time of the job, training and report step.", "",
             "| " + " | ".join(md_cols) + " |", "|" + "---|" * len(md_cols)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in md_cols) + " |" for r in rows]
    md, cv = plan.run / "report.md", plan.run / "report.csv"
    write_text(md, "\n".join(lines) + "\n")
    write_text(cv, buf.getvalue())
    return md, cv
