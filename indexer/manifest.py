"""The manifest: JSON Lines, one study per line, the one format every source converts to.

``{"study_id", "patient_id", "study_date" (YYYY-MM-DD|null), "modality", "images": [paths],
"report": text|null, "view": [...]?}``. Relative image paths resolve against the manifest's
own directory, so a manifest and its images can move together.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec

from retrieval.records import Study
from retrieval.storage import atomic_write_bytes


class ManifestError(ValueError):
    """A manifest line that is not a valid study; names file and line."""


def _validate(study: Study, where: str) -> Study:
    if not study.study_id.strip():
        raise ManifestError(f"{where}: empty study_id")
    if study.study_date is not None:
        try:
            dt.date.fromisoformat(study.study_date)
        except ValueError as exc:
            raise ManifestError(f"{where}: study_date {study.study_date!r} is not YYYY-MM-DD") from exc
    for img in study.images:
        if not img or "\x00" in img:
            raise ManifestError(f"{where}: invalid image path {img!r}")
    return study


def read_manifest(path: str | Path, errors: list[str] | None = None) -> Iterator[Study]:
    """Yield studies; with ``errors`` given, bad lines are reported there and skipped."""
    dec = msgspec.json.Decoder(Study)
    seen: set[str] = set()
    with open(path, "rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                study = _validate(dec.decode(line), where)
                if study.study_id in seen:
                    raise ManifestError(f"{where}: duplicate study_id {study.study_id!r}")
                seen.add(study.study_id)
            except (msgspec.DecodeError, msgspec.ValidationError, ManifestError) as exc:
                msg = str(exc) if isinstance(exc, ManifestError) else f"{where}: {exc}"
                if errors is None:
                    raise ManifestError(msg) from exc
                errors.append(msg)
                continue
            yield study


def write_manifest(path: str | Path, studies: Iterable[Study]) -> int:
    """Write atomically (temp file + rename); returns the number of studies written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [msgspec.json.encode(s) + b"\n" for s in studies]
    atomic_write_bytes(path, b"".join(lines))
    return len(lines)


def relative_to_manifest(manifest_path: str | Path, image: Path) -> str:
    base = Path(manifest_path).resolve().parent
    try:
        return str(image.resolve().relative_to(base))
    except ValueError:
        return str(image.resolve())
