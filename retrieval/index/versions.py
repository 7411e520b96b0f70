"""Versioned index directories with atomic publish, for the file-based backends.

Layout: ``<root>/versions/<vNNNNNN>/`` holds one complete build; ``<root>/CURRENT`` names the
version readers open. A build writes into ``<root>/.staging-<pid>-<rand>/``, then renames it
into ``versions/`` and replaces ``CURRENT`` with ``os.replace`` (atomic on POSIX). A killed build
leaves only a staging directory, which readers never look at: a half-built index is never served;
the next writer collects it (:func:`collect_staging`: the pid in its name is no longer alive).

Every version carries ``checksums.json`` (size and SHA-256 of each file, written last, before
the publish rename). Readers verify it before opening (:func:`verify_version`; a flipped byte,
a truncated ``.faiss`` or a missing Qdrant segment is named, not served), and
``medrag index verify`` checks it on demand. ``MEDRAG_VERIFY=size`` checks sizes only (for very
large indexes whose full hash at each open costs seconds); ``full`` is the default.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from retrieval.index.base import IndexError_
from retrieval.storage import atomic_write_text, fsync_dir

CURRENT = "CURRENT"
CHECKSUMS = "checksums.json"
STAGING_PREFIX = ".staging-"
log = logging.getLogger(__name__)


def current_version(root: Path) -> Path:
    pointer = root / CURRENT
    if not pointer.is_file():
        raise IndexError_(f"no published index at {root} (missing {CURRENT}; was the build finished?)")
    name = pointer.read_text().strip()
    path = root / "versions" / name
    if not path.is_dir():
        raise IndexError_(f"{root}: {CURRENT} names {name!r}, which does not exist")
    return path


def published_version(root: Path) -> str | None:
    """The name ``CURRENT`` points at now (None: nothing published); cheap enough to poll."""
    try:
        return (root / CURRENT).read_text().strip() or None
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def stale_staging(root: Path) -> list[Path]:
    """Staging folders under ``root`` whose writer process is gone (killed builds)."""
    out = []
    for p in sorted(root.glob(f"{STAGING_PREFIX}*")):
        pid = p.name[len(STAGING_PREFIX):].split("-", 1)[0]
        if p.is_dir() and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            out.append(p)
    return out


def collect_staging(root: Path) -> list[str]:
    """Remove staging directories of killed writers (their pid is gone); returns their names.

    A SIGKILL between ``new_staging`` and the publish rename leaves a staging directory up to a
    full version in size; without collection they accumulate. Stagings of live processes (another
    writer on this host building beside this one, e.g. a test) are left alone.
    """
    removed = []
    for p in stale_staging(root):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p.name)
    if removed:
        log.info("collected %d staging folder(s) of killed builds under %s", len(removed), root)
    return removed


def new_staging(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    collect_staging(root)
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _json_sha256(path: Path) -> str | None:
    """SHA-256 of a JSON file's canonical form (sorted keys), None if it does not parse.

    Why: the embedded Qdrant engine rewrites its JSON configs each time it loads a shard, with
    the same content in another key order (a Rust hash map); bytes would differ, meaning not."""
    try:
        canonical = json.dumps(json.loads(path.read_bytes()), sort_keys=True, separators=(",", ":"))
    except (OSError, ValueError):
        return None
    return hashlib.sha256(canonical.encode()).hexdigest()


def _entry(f: Path) -> dict[str, object]:
    if f.suffix == ".json" and (canonical := _json_sha256(f)) is not None:
        return {"json_sha256": canonical}
    return {"size": f.stat().st_size, "sha256": _sha256(f)}


def write_checksums(folder: Path) -> None:
    """Record size and SHA-256 of every file under ``folder`` (call last, before publishing);
    JSON files by their canonical content."""
    files = {str(f.relative_to(folder)): _entry(f)
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != CHECKSUMS}
    atomic_write_text(folder / CHECKSUMS, json.dumps({"algorithm": "sha256", "files": files}, indent=1))


def verify_mode() -> str:
    from retrieval.settings import env

    mode = env().verify
    if mode not in ("full", "size"):
        raise IndexError_(f"MEDRAG_VERIFY={mode!r}: expected full or size")
    return mode


def verify_version(folder: Path, mode: str | None = None) -> list[str]:
    """Problems with a version's files against its ``checksums.json`` (empty: intact).

    Names are relative to the version, so a message can be shown to an unauthenticated client
    (``/health``) without revealing where the index lives. A version written before checksums
    existed has nothing to compare with: one problem says so only when ``mode`` is ``strict``.
    """
    mode = mode or verify_mode()
    record = folder / CHECKSUMS
    if not record.is_file():
        return ["no checksums.json (built before checksums; rebuild to protect it)"] if mode == "strict" else []
    try:
        files = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"{CHECKSUMS} is unreadable ({type(exc).__name__})"]
    problems = []
    for rel, want in files.items():
        f = folder / rel
        try:
            size = f.stat().st_size
        except OSError:
            problems.append(f"{rel}: missing")
            continue
        if "json_sha256" in want:
            if _json_sha256(f) != want["json_sha256"]:
                problems.append(f"{rel}: content differs from its checksum (corrupted)")
        elif size != want["size"]:
            problems.append(f"{rel}: {size} bytes, expected {want['size']} (truncated or replaced)")
        elif mode in ("full", "strict") and _sha256(f) != want["sha256"]:
            problems.append(f"{rel}: content differs from its checksum (corrupted)")
    return problems


def open_version(root: Path) -> Path:
    """The current version, verified: :class:`IndexError_` naming the damaged files otherwise."""
    path = current_version(root)
    problems = verify_version(path)
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IndexError_(f"version {path.name} failed verification: {'; '.join(problems[:3])}{more}")
    return path


def next_version_name(root: Path) -> str:
    existing = [p.name for p in (root / "versions").glob("v*") if p.name[1:].isdigit()]
    return f"v{max((int(n[1:]) for n in existing), default=0) + 1:06d}"


def publish(root: Path, staging: Path, keep: int = 2) -> str:
    """Move ``staging`` into ``versions/`` and point ``CURRENT`` at it; prune old versions."""
    (root / "versions").mkdir(parents=True, exist_ok=True)
    if not (staging / CHECKSUMS).is_file():
        write_checksums(staging)
    name = next_version_name(root)
    os.replace(staging, root / "versions" / name)
    fsync_dir(root / "versions")
    atomic_write_text(root / CURRENT, name + "\n")
    versions = sorted(p for p in (root / "versions").glob("v*") if p.name != name)
    for old in versions[: max(0, len(versions) - (keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    return name
