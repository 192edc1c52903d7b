"""What every hostile-input test checks about a command: one `error:` line, exit 2, no traceback,
and the user's files exactly as they were (compared before and after)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from typer.testing import CliRunner

from zoodip_edge.cli import app

runner = CliRunner()
TOKEN = "<red-ball>"


def snapshot(*roots: Path) -> dict[str, str]:
    """Every path under ``roots`` (links not followed): sha256 of files, link targets, folders."""
    snap = {}
    for root in map(Path, roots):
        if root.is_symlink() or root.is_file():
            entries = [root]
        else:
            entries = [root] if root.is_dir() else []
            for folder, dirs, files in os.walk(root):
                entries += [Path(folder) / n for n in dirs + files]
        for p in entries:
            if p.is_symlink():
                snap[str(p)] = "link -> " + os.readlink(p)
            elif p.is_dir():
                snap[str(p)] = "folder"
            elif not p.is_file():  # a FIFO or device: reading it would block
                snap[str(p)] = f"special {os.lstat(p).st_mode:o}"
            else:
                snap[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


def refused(args: list, *roots: Path, match: str) -> str:
    """Run the CLI; it must exit 2 with one ``error:`` line on stderr containing ``match``, no
    traceback, and leave everything under ``roots`` as it was (nothing changed, added or removed)."""
    before = snapshot(*roots)
    r = runner.invoke(app, [str(a) for a in args])
    after = snapshot(*roots)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.output and match in lines[0], lines[0]
    assert after == before, {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    return lines[0]


def ok(args: list) -> None:
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (r.output, r.exception)


def write(path: Path, text: str = "the user's own notes") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def personalize_args(bundle, photos, out, *extra) -> list:
    return ["personalize", bundle, photos, "--token", TOKEN, "--init", "dog", "--out", out, "--device", "cpu",
            "--quiet", *extra]
