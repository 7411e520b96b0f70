"""Encoded studies kept on disk between builds: the unit that makes builds resumable.

A build encodes studies in *segments* of a few hundred; each segment is one ``.npz`` written to
a temporary name, fsynced and renamed, so a segment file is either complete or absent (a
SIGKILL leaves at most a temp file, removed on the next run). A study is identified by a
*study key*: a hash of its manifest record, its resolved image paths and their size and mtime.
Segments live under a directory named by the encoder *fingerprint* (families, checkpoints,
conditioning), so vectors from another encoder are never mixed in.

A rerun, an incremental add or a delete reads which study keys are already encoded and encodes
only the rest; the index is then assembled from segments in manifest order and published
atomically. One writer at a time: :func:`build_lock` holds an exclusive ``flock`` (released by
the kernel even on SIGKILL).

Every segment has a ``.sha256`` sidecar written before it. A segment that fails its checksum or
cannot be parsed (flipped bytes, a truncated zip, ``Bad CRC-32``) is never fatal: it is named,
moved to ``quarantine/`` beside the segments and its studies are encoded again
(:class:`CorruptSegment`, :meth:`SegmentStore.quarantine`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

from retrieval.imaging.paths import manifest_image
from retrieval.records import Payload, Study
from retrieval.storage import LockedError, atomic_write_bytes, exclusive_lock, remove_stale_temps

log = logging.getLogger(__name__)
QUARANTINE = "quarantine"
# what a damaged .npz raises from numpy/zipfile/json/msgspec
_DAMAGE = (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, zlib.error, msgspec.DecodeError,
           msgspec.ValidationError)


class CorruptSegment(Exception):
    """A segment file is damaged; ``path`` names it, the message says how."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"segment {path.name} is damaged: {why}")
        self.path = path
        self.why = why


class BuildLockedError(LockedError):
    """Another build holds the lock for this index."""


@contextmanager
def build_lock(state_dir: Path) -> Iterator[None]:
    try:
        with exclusive_lock(state_dir / "lock", "another build writing this index"):
            yield
    except LockedError as exc:
        raise BuildLockedError(str(exc)) from exc


def study_key(study: Study, manifest: str | Path) -> str:
    h = hashlib.sha256(msgspec.json.encode(study))
    for rel in study.images:
        p = manifest_image(manifest, rel)
        try:
            st = p.stat()
            h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
        except OSError:
            h.update(f"|{p}|missing".encode())
    return h.hexdigest()[:32]


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class Segment:
    """Encoded points of a group of studies (a study may have 0..n points)."""

    study_keys: list[str]  # every study of the segment, in order (also those fully skipped)
    point_study: list[str] = field(default_factory=list)  # study key of each point
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # space -> (points, dim)
    present: dict[str, np.ndarray] = field(default_factory=dict)  # space -> (points,) bool
    payloads: list[Payload] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # study key -> messages


class SegmentStore:
    def __init__(self, root: Path, collect: bool = True) -> None:
        """``collect``: remove a killed writer's temp files. Only the build's driver (which holds
        the build lock) collects; a worker writing beside other workers (the Ray engine) must
        not, or it deletes their half-written temps before they are renamed."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        if collect:
            remove_stale_temps(root)

    def files(self) -> list[Path]:
        return sorted(self.root.glob("seg-*.npz"))

    @staticmethod
    def sidecar(path: Path) -> Path:
        return path.with_suffix(".sha256")

    def encoded_keys(self) -> dict[str, Path]:
        """Study key -> the segment file holding it (first one wins). A segment whose keys cannot
        be read is quarantined here, so its studies count as not encoded and are encoded again."""
        out: dict[str, Path] = {}
        for f in self.files():
            try:
                with open(f, "rb") as fh, np.load(fh, allow_pickle=False) as z:  # fh: closed on BadZipFile too
                    keys = json.loads(str(z["study_keys"]))
            except _DAMAGE as exc:
                self.quarantine(f, f"{type(exc).__name__}: {exc}")
                continue
            for k in keys:
                out.setdefault(k, f)
        return out

    def quarantine(self, path: Path, why: str) -> Path:
        """Move a damaged segment (and its checksum) out of the way, keeping it for inspection."""
        dest = self.root / QUARANTINE
        dest.mkdir(exist_ok=True)
        target = dest / f"{path.stem}.{time.strftime('%Y%m%dT%H%M%S')}{path.suffix}"
        for src, dst in ((path, target), (self.sidecar(path), target.with_suffix(".sha256"))):
            if src.exists():
                src.replace(dst)
        log.warning("segment %s is damaged (%s): moved to %s; its studies will be encoded again",
                    path.name, why, target)
        return target

    def check(self, path: Path) -> str | None:
        """What is wrong with a segment file (None: intact), reading it whole."""
        try:
            self.read(path)
        except CorruptSegment as exc:
            return exc.why
        return None

    def write(self, seg: Segment) -> Path:
        name = f"seg-{hashlib.sha256(''.join(seg.study_keys).encode()).hexdigest()[:20]}.npz"
        final = self.root / name
        arrays: dict[str, Any] = {
            "study_keys": np.array(json.dumps(seg.study_keys)),
            "point_study": np.array(json.dumps(seg.point_study)),
            "payloads": np.array(msgspec.json.encode(seg.payloads).decode()),
            "skipped": np.array(json.dumps(seg.skipped)),
            "spaces": np.array(json.dumps(sorted(seg.vectors))),
        }
        for i, space in enumerate(sorted(seg.vectors)):
            arrays[f"v{i}"] = seg.vectors[space]
            arrays[f"m{i}"] = seg.present[space]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        data = buf.getvalue()
        # sidecar first: a segment is never visible without the checksum it must match
        atomic_write_bytes(self.sidecar(final), hashlib.sha256(data).hexdigest().encode())
        atomic_write_bytes(final, data)
        return final

    @classmethod
    def read(cls, path: Path) -> Segment:
        """The segment at ``path``, checked against its sidecar; :class:`CorruptSegment` if damaged."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorruptSegment(path, f"unreadable ({exc.strerror or type(exc).__name__})") from exc
        side = cls.sidecar(path)
        if side.exists():
            want = side.read_text().strip()
            if hashlib.sha256(data).hexdigest() != want:
                raise CorruptSegment(path, "content differs from its checksum")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                spaces = json.loads(str(z["spaces"]))
                return Segment(study_keys=json.loads(str(z["study_keys"])),
                               point_study=json.loads(str(z["point_study"])),
                               vectors={s: z[f"v{i}"] for i, s in enumerate(spaces)},
                               present={s: z[f"m{i}"].astype(bool) for i, s in enumerate(spaces)},
                               payloads=msgspec.json.decode(str(z["payloads"]), type=list[Payload]),
                               skipped=json.loads(str(z["skipped"])))
        except _DAMAGE as exc:
            raise CorruptSegment(path, f"{type(exc).__name__}: {exc}") from exc
