"""Versioned index directories with atomic publish, for the file-based backends.

Layout: ``<root>/versions/<vNNNNNN>/`` holds one complete build; ``<root>/CURRENT`` names the
version readers open. A build writes into ``<root>/.staging-<pid>-<rand>/``, then renames it
into ``versions/`` and replaces ``CURRENT`` with ``os.replace`` (atomic on POSIX). A killed build
leaves only a staging directory, which readers never look at: a half-built index is never served.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from retrieval.index.base import IndexError_
from retrieval.storage import atomic_write_text, fsync_dir

CURRENT = "CURRENT"


def current_version(root: Path) -> Path:
    pointer = root / CURRENT
    if not pointer.is_file():
        raise IndexError_(f"no published index at {root} (missing {CURRENT}; was the build finished?)")
    name = pointer.read_text().strip()
    path = root / "versions" / name
    if not path.is_dir():
        raise IndexError_(f"{root}: {CURRENT} names {name!r}, which does not exist")
    return path


def new_staging(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=root))


def next_version_name(root: Path) -> str:
    existing = [p.name for p in (root / "versions").glob("v*") if p.name[1:].isdigit()]
    return f"v{max((int(n[1:]) for n in existing), default=0) + 1:06d}"


def publish(root: Path, staging: Path, keep: int = 2) -> str:
    """Move ``staging`` into ``versions/`` and point ``CURRENT`` at it; prune old versions."""
    (root / "versions").mkdir(parents=True, exist_ok=True)
    name = next_version_name(root)
    os.replace(staging, root / "versions" / name)
    fsync_dir(root / "versions")
    atomic_write_text(root / CURRENT, name + "\n")
    versions = sorted(p for p in (root / "versions").glob("v*") if p.name != name)
    for old in versions[: max(0, len(versions) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return name
