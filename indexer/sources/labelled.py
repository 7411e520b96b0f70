"""Image folders with a CSV: labelled images (finding labels) and images with free-text notes.

Two general adapters, not one-off scripts for the shared sets:

* :func:`from_labels_csv`: one row per image, a ``|``-separated label column ("No Finding" for a
  normal study), optional patient and view columns (the NIH ChestX-ray14 ``Data_Entry`` layout
  and anything shaped like it). Labels become the study's ground truth (``Study.labels``); every
  label must name a finding of the taxonomy (synonyms such as ``Pleural_Thickening`` or
  ``Infiltration`` resolve), so filters and label-set similarity speak the same vocabulary.
* :func:`from_notes_csv`: one row per image with free-text notes (mined like reports), a patient
  and a day offset (prior/current pairs), optional per-image notes, lung boxes and graded scores
  (the COVID-19 image collection layout).

Both read any folder laid out the same way (the CSV beside an ``images/`` folder), e.g. an
independent split. Bad rows never stop the run: a missing or duplicate image drops the row, an
unknown label or an empty notes cell keeps the row without it; each case is reported by CSV row.
"""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

from indexer.manifest import relative_to_manifest
from indexer.sources import SourceResult
from retrieval.records import Study
from retrieval.taxonomy import Taxonomy, UnknownTermError, default_taxonomy

NORMAL_LABELS = ("no finding", "normal", "none")
# prior/current pairs only need order and interval; real dates are not in these sets, so study
# dates are this anchor plus the row's day offset (documented, never mistaken for a real date)
ANCHOR_DATE = dt.date(2000, 1, 1)


def _rows(csv_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        for n, row in enumerate(csv.DictReader(fh), start=2):  # row 1 is the header
            yield n, {k.strip(): (v or "").strip() for k, v in row.items() if k}


def _find_csv(folder: Path, csv_name: str | None, default: str) -> Path:
    path = folder / (csv_name or default)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (the CSV with one row per image)")
    return path


def _image(folder: Path, rel: str, where: str, seen: dict[Path, str], res: SourceResult) -> Path | None:
    if not rel:
        res.skipped.append(f"{where}: empty image cell")
        return None
    path = (folder / rel).resolve()
    if path in seen:
        res.skipped.append(f"{where}: duplicate image {rel} (first used by {seen[path]})")
        return None
    if not path.is_file():
        res.skipped.append(f"{where}: image {rel} not found")
        return None
    seen[path] = where
    return path


def canonical_label(name: str, tax: Taxonomy) -> str:
    """The taxonomy finding a dataset's label names (``Pleural_Thickening`` -> pleural thickening)."""
    return tax.finding(name).name


def from_labels_csv(folder: str | Path, out: str | Path, csv_name: str | None = None, image_col: str = "image",
                    labels_col: str = "labels", patient_col: str = "patient_id", view_col: str = "view",
                    sep: str = "|", modality: str = "DX", taxonomy: Taxonomy | None = None) -> SourceResult:
    """A labelled image folder -> one study per image whose ground truth is its labels.

    ``Study.labels`` keeps the dataset's own label names (reports speak them); a normal study
    ("No Finding") has ``labels == []``, which is a statement (nothing found), unlike ``None``.
    """
    tax = taxonomy or default_taxonomy()
    folder = Path(folder)
    path = _find_csv(folder, csv_name, "labels.csv")
    res = SourceResult()
    seen: dict[Path, str] = {}
    for n, row in _rows(path):
        where = f"{path.name} row {n}"
        if image_col not in row or labels_col not in row:
            raise ValueError(f"{path}: needs columns {image_col!r} and {labels_col!r} (has {', '.join(row)})")
        img = _image(folder, row[image_col], where, seen, res)
        if img is None:
            continue
        labels: list[str] = []
        for raw in (x.strip() for x in row[labels_col].split(sep)):
            if not raw or raw.lower() in NORMAL_LABELS:
                continue
            try:
                canonical_label(raw, tax)
            except UnknownTermError:
                res.warnings.append(f"{where}: unknown label {raw!r} left out (not a taxonomy finding)")
                continue
            labels.append(raw)
        if not row[labels_col].strip():
            res.warnings.append(f"{where}: empty label cell; indexed without ground truth")
        view = row.get(view_col) or None
        res.studies.append(Study(
            study_id=img.stem, images=[relative_to_manifest(out, img)],
            patient_id=row.get(patient_col) or None, modality=modality,
            view=[view] if view else None,
            labels=sorted(set(labels)) if row[labels_col].strip() else None))
    return res


def _box(value: str) -> list[float] | None:
    try:
        parts = [float(x) for x in value.split(",")] if value else []
    except ValueError:
        return None
    return parts if len(parts) == 4 else None


def from_notes_csv(folder: str | Path, out: str | Path, csv_name: str | None = None, image_col: str = "image",
                   notes_col: str = "notes", image_note_col: str = "image_note", patient_col: str = "patient_id",
                   offset_col: str = "offset_days", view_col: str = "view",
                   score_cols: tuple[str, ...] = ("severity_extent", "severity_opacity"),
                   box_cols: tuple[str, ...] = ("left_lung_box", "right_lung_box"), modality: str = "CR") -> SourceResult:
    """Images with free-text notes -> studies whose report is the image's own note, else the case notes.

    The per-image note is preferred: case notes repeat across a patient's follow-ups and sometimes
    describe CT. Rows of one patient become a timeline (``study_date`` = anchor + day offset), so
    prior/current pairs for comparison come from :func:`follow_up_pairs`.
    """
    folder = Path(folder)
    path = _find_csv(folder, csv_name, "metadata.csv")
    res = SourceResult()
    seen: dict[Path, str] = {}
    for n, row in _rows(path):
        where = f"{path.name} row {n}"
        if image_col not in row:
            raise ValueError(f"{path}: needs column {image_col!r} (has {', '.join(row)})")
        img = _image(folder, row[image_col], where, seen, res)
        if img is None:
            continue
        report = row.get(image_note_col) or row.get(notes_col) or None
        if report is None:
            res.warnings.append(f"{where}: empty notes cell; indexed without a report")
        date = None
        if row.get(offset_col):
            try:
                date = (ANCHOR_DATE + dt.timedelta(days=int(float(row[offset_col])))).isoformat()
            except (ValueError, OverflowError):
                res.warnings.append(f"{where}: day offset {row[offset_col]!r} is not a number; no date")
        scores: dict[str, float] = {}
        for col in score_cols:
            if row.get(col):
                try:
                    scores[col] = float(row[col])
                except ValueError:
                    res.warnings.append(f"{where}: {col} {row[col]!r} is not a number")
        meta = {col: b for col in box_cols if (b := _box(row.get(col, ""))) is not None}
        view = row.get(view_col) or None
        res.studies.append(Study(
            study_id=img.stem, images=[relative_to_manifest(out, img)], report=report,
            patient_id=row.get(patient_col) or None, study_date=date, modality=modality,
            view=[view] if view else None, scores=scores or None, image_meta=[meta] if meta else None))
    return res


def follow_up_pairs(studies: list[Study]) -> list[tuple[Study, Study]]:
    """(prior, current) for consecutive dated studies of each patient, oldest first."""
    by_patient: dict[str, list[Study]] = {}
    for s in studies:
        if s.patient_id and s.study_date:
            by_patient.setdefault(s.patient_id, []).append(s)
    pairs = []
    for group in by_patient.values():
        group.sort(key=lambda s: (s.study_date or "", s.study_id))
        pairs += [(a, b) for a, b in zip(group, group[1:], strict=False) if a.study_date != b.study_date]
    return pairs
