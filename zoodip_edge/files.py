"""Writing files so that readers never see a partial one, and nothing of the user's is lost.

Every name made beside a target is hidden and ours alone: ``.NAME.PID-HEX.tmp`` (write_atomic),
``.NAME.lock`` (exclusive_lock), and export's ``.NAME.partial-PID-HEX`` / ``.NAME.old-PID-HEX``
folders (bundle.py). A name carrying a PID that is no longer alive is a leftover of a killed
writer and is removed by the next writer of the same target; nothing else is ever removed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not locked
    fcntl = None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists; True where that cannot be told (then nothing is removed)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) on Windows would terminate the process
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def remove_stale(folder: Path, pattern: str, folders: bool = False) -> list[Path]:
    """Remove the entries of ``folder`` whose whole name matches ``pattern`` (a regex whose first
    group is the writer's PID) and whose writer is dead: regular files, or with ``folders`` only
    folders (links and anything else are not ours). Best effort; returns what was removed."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    rx = re.compile(pattern)
    for name in names:
        m = rx.fullmatch(name)
        if not m or pid_alive(int(m.group(1))):
            continue
        p = Path(folder) / name
        try:
            mode = os.lstat(p).st_mode
            if folders and stat.S_ISDIR(mode):
                shutil.rmtree(p)
            elif not folders and stat.S_ISREG(mode):
                p.unlink()
            else:
                continue
        except OSError:
            continue  # a leftover is harmless; failing the write for it is not
        removed.append(p)
    return removed


def _tmp_pattern(path: Path) -> str:
    return rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{12}}\.tmp"


def write_atomic(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, ``os.replace``; the temp file is removed on any error,
    and temp files of writers of ``path`` that were killed are removed first."""
    if path.is_dir():
        raise UserError(f"cannot write {path}: it is a folder")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create folder {path.parent}: {e.strerror or e}") from None
    remove_stale(path.parent, _tmp_pattern(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL: never follow or clobber anything; mode 0o666 lets the umask apply as usual.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except PermissionError:
        raise UserError(f"cannot write {path}: permission denied") from None
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, (BlockingIOError, InterruptedError)):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from e
        raise
    _fsync_dir(path.parent)


def save_image(image: Any, path: Path) -> None:
    """A PIL image as PNG, written atomically (never a half-written image at ``path``)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    write_atomic(Path(path), buf.getvalue())


def refuse_existing(paths: Iterable[Path]) -> None:
    """One line naming the first of ``paths`` that exists, for a command run without --force."""
    found = [Path(p) for p in paths if os.path.lexists(p)]
    if found:
        more = f" (and {len(found) - 1} more of its outputs)" if len(found) > 1 else ""
        raise UserError(f"{found[0]} exists{more}; pass --force to replace it")


def check_regular_file(path: Path, what: str) -> None:
    """Refuse in one line a path to read that is missing, a folder, or not a regular file (a FIFO
    or device would block the read, or never end)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {(e.strerror or type(e).__name__).lower()}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {path} is a folder, not a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file")


def check_writable(target: Path, what: str = "output") -> None:
    """Refuse, before any work, an output whose folder (or nearest existing ancestor, for folders
    still to be made) is not a folder or cannot be written: tried with a file of our own, since
    permission bits say nothing about read-only file systems or root."""
    folder = Path(target).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write {what} {target}: {folder} is not a folder")
    probe = folder / f".zoodip-write-test-{os.getpid()}-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as e:
        raise UserError(f"cannot write {what} {target}: {folder}: {e.strerror}") from None
    os.close(fd)
    os.unlink(probe)


def lock_path(target: Path) -> Path:
    return Path(target).parent / f".{Path(target).name}.lock"


@contextlib.contextmanager
def exclusive_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a hidden ``.NAME.lock`` file beside it) or refuse in
    one line if another process holds it. Does not wait. Not available without fcntl: no lock.

    The lock file is removed on release. A process that opened it before the removal and locks
    it afterwards holds a lock on a deleted file; it sees that the path names another file (or
    none) and tries again, so two holders never overlap.
    """
    if fcntl is None:
        yield
        return
    lock = lock_path(target)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as e:
            raise UserError(f"cannot create lock file {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if isinstance(e, BlockingIOError):
                raise UserError(f"another run is using {target} (it holds {lock}); wait for it to finish") from None
            raise UserError(f"cannot lock {lock}: {e.strerror or e}") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still locked: a waiter re-checks and locks a new file
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (POSIX); best effort, not available everywhere."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
