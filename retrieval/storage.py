"""Atomic file and directory writes, and the single-writer lock: the one owner of both.

Why one module: every file medrag writes (manifests, segments, checkpoints, key files, index
pointers, training state) must be either complete or absent after a crash, and a second writer
must be refused, not interleaved. Each of those used to carry its own temp-file-and-rename; a
fix to one (fsync of the directory, cleanup of the temp name on error) now reaches all.

Callers may rely on: after a successful call the new content is durable (file and directory
fsynced); after an exception or a SIGKILL, the previous content (or nothing) is at ``path`` and
at most a dot-prefixed temp file remains beside it, which :func:`remove_stale_temps` collects.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

TEMP_PREFIX = ".tmp-"


class LockedError(RuntimeError):
    """Another process holds the lock."""


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object], mode: int | None = None) -> None:
    """Call ``write(fh)`` on a temp file beside ``path``, fsync, rename over ``path``.

    ``mode`` sets the permission bits before the rename (e.g. 0o600 for secrets), so the file is
    never visible with looser ones.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Readers of ``path`` see the old bytes or ``data``, never a mix."""
    atomic_write(path, lambda fh: fh.write(data), mode)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | Path, obj: Any, mode: int | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1), mode)


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``target``; on success it replaces ``target`` whole.

    A directory cannot be renamed over a non-empty one, so an existing ``target`` is first moved
    aside and removed after the swap: a crash between the two renames leaves the old version
    under a temp name (collected later) and the new one complete, never a half-written mix.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a published directory is as readable as any
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{target.name}.old.", dir=target.parent))
            os.replace(target, old / "x")
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(folder: str | Path) -> int:
    """Remove temp files/directories left in ``folder`` by killed writers; returns how many."""
    n = 0
    for p in Path(folder).glob(f"{TEMP_PREFIX}*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


@contextmanager
def exclusive_lock(lock_file: str | Path, what: str = "another process") -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``lock_file`` for the block.

    The kernel releases it when the holder dies, so a SIGKILLed writer never leaves a stale lock.

    Raises:
        LockedError: the lock is held; the message names ``what`` and the lock file.
    """
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fh = open(lock_file, "a+")  # noqa: SIM115 (held for the whole block)
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise LockedError(f"{what} holds the lock {lock_file}") from exc
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fh.close()
