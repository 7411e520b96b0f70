"""A folder of PNG/JPEG images with a reports CSV.

CSV columns: ``study_id`` and ``report`` (required); ``images`` (``;``-separated paths relative
to the folder), ``patient_id``, ``study_date``, ``modality``, ``view`` (optional). Without an
``images`` column, a study's images are the files named ``<study_id>.<ext>`` or
``<study_id>_*.<ext>``, or every image in the sub-folder ``<study_id>/``.

Nothing is dropped in silence: every image of the folder becomes a study. An image no row claims
is a study of its own without a report (its id is its path below the folder without the
extension) and is listed by name in :attr:`SourceResult.warnings`; a row whose images are not in
the folder is listed by name in :attr:`SourceResult.skipped`.
"""

from __future__ import annotations

import csv
from pathlib import Path

from indexer.manifest import relative_to_manifest
from indexer.sources import SourceResult
from retrieval.records import Study

IMAGE_EXT = {".png", ".jpg", ".jpeg"}


def from_folder(folder: str | Path, reports_csv: str | Path, manifest_path: str | Path) -> SourceResult:
    folder = Path(folder)
    out = SourceResult()
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXT and p.is_file())
    claimed: set[Path] = set()
    with open(reports_csv, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        if not {"study_id", "report"} <= cols:
            raise ValueError(f"{reports_csv}: needs columns study_id and report (has {sorted(cols)})")
        for n, row in enumerate(reader, 2):
            sid = (row.get("study_id") or "").strip()
            if not sid:
                out.skipped.append(f"{reports_csv}:{n}: empty study_id")
                continue
            if row.get("images"):
                paths = [folder / p.strip() for p in row["images"].split(";") if p.strip()]
            else:
                paths = [p for p in files if p.stem == sid or p.stem.startswith(f"{sid}_") or p.parent.name == sid]
            found = [p for p in paths if p.is_file()]
            for p in paths:
                if not p.is_file():
                    out.skipped.append(f"{p}: image listed for study {sid} not found")
            if not found:
                out.skipped.append(f"study {sid} ({reports_csv}:{n}): no image of it in {folder}")
                continue
            claimed.update(p.resolve() for p in found)
            report = (row.get("report") or "").strip() or None
            out.studies.append(Study(
                study_id=sid,
                images=[relative_to_manifest(manifest_path, p) for p in found],
                report=report,
                patient_id=(row.get("patient_id") or "").strip() or None,
                study_date=(row.get("study_date") or "").strip() or None,
                modality=(row.get("modality") or "").strip() or None,
                view=[v for v in (row.get("view") or "").split(";") if v] or None,
            ))
    taken = {s.study_id for s in out.studies}
    for p in files:  # every image no row claims: a study of its own, without a report, listed
        if p.resolve() in claimed:
            continue
        rel = p.relative_to(folder)
        sid = rel.with_suffix("").as_posix()
        if sid in taken:
            sid = rel.as_posix()
        taken.add(sid)
        out.studies.append(Study(study_id=sid, images=[relative_to_manifest(manifest_path, p)]))
        out.warnings.append(f"{rel.as_posix()}: no row in {Path(reports_csv).name}; indexed as study {sid} "
                            "without a report")
    return out
