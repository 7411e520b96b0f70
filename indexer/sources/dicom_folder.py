"""A folder of DICOM files, grouped into studies by StudyInstanceUID.

Only headers are read here (fast), and they pass the PHI guard (:mod:`indexer.phi`) before
anything reaches the manifest: ids become keyed pseudonyms, dates are shifted per patient, every
other PS3.15 Basic Profile attribute is dropped, and burned-in-annotation images are skipped
unless allowed. Volumes (a CT/MR series of many
single-frame slices) contribute their middle slice, since retrieval here is 2D. Reports come
from an optional CSV keyed by ``StudyInstanceUID`` or ``AccessionNumber`` (column ``report``).
"""

from __future__ import annotations

import csv
import logging
import os
from collections import defaultdict
from pathlib import Path

from indexer.manifest import relative_to_manifest
from indexer.phi import PhiPolicy, burned_in, deidentify
from indexer.sources import SourceResult
from retrieval.imaging.dicom import DicomDecodeError, as_int, read_header
from retrieval.records import Study

log = logging.getLogger(__name__)
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


def pseudonym(value: str, kind: str) -> str:
    """Keyed pseudonym with the environment's key (see :class:`indexer.phi.PhiPolicy`)."""
    return PhiPolicy.from_env().pseudonym(value, kind)


def read_reports_csv(path: str | Path | None) -> dict[str, str]:
    """Reports keyed by StudyInstanceUID or AccessionNumber (columns of those names + ``report``)."""
    out: dict[str, str] = {}
    if path:
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                key = (row.get("StudyInstanceUID") or row.get("AccessionNumber") or "").strip()
                if key and (row.get("report") or "").strip():
                    out[key] = row["report"].strip()
    return out


def from_dicom_folder(folder: str | Path, manifest_path: str | Path,
                      reports_csv: str | Path | None = None, allow_burned_in: bool = False) -> SourceResult:
    folder = Path(folder)
    out = SourceResult()
    policy = PhiPolicy.from_env(allow_burned_in)
    reports = read_reports_csv(reports_csv)
    studies: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for path in _walk(folder):
        try:
            head = read_header(path)
        except DicomDecodeError as exc:
            out.skipped.append(str(exc))
            continue
        uid = head.get("StudyInstanceUID")
        if not uid:
            out.skipped.append(f"{path}: no StudyInstanceUID")
            continue
        if burned_in(head) and not policy.allow_burned_in:
            out.skipped.append(f"{path}: flagged BurnedInAnnotation=YES (may show identifiers); "
                               "allow with --allow-burned-in")
            continue
        studies[str(uid)].append((path, head))
    for uid, members in studies.items():
        chosen = _representatives(members)
        first = chosen[0][1]
        report = reports.get(uid) or reports.get(str(first.get("AccessionNumber", ""))) or None
        out.studies.append(study_from_headers(
            [(relative_to_manifest(manifest_path, p), h) for p, h in chosen], report, policy))
    return out


def study_from_headers(images: list[tuple[str, dict]], report: str | None, policy: PhiPolicy) -> Study:
    """One study's manifest record from its representative images' raw headers, de-identified.

    The report text is de-identified here too, while the raw PatientID is at hand: its dates move
    by exactly the header dates' offset (the build's own pass, which sees only pseudonyms, leaves
    an already shifted ``[DATE ...]`` alone)."""
    from indexer.deid import deidentify_text

    safe = [deidentify(h, policy) for _, h in images]
    first = safe[0]
    raw_patient = str(images[0][1].get("PatientID") or "") or None
    if report:
        report = deidentify_text(report, raw_patient, policy).text
    return Study(study_id=first["StudyInstanceUID"], images=[rel for rel, _ in images], report=report,
                 patient_id=first.get("PatientID"), study_date=first.get("StudyDate"),
                 modality=first.get("Modality"),
                 view=sorted({str(h["ViewPosition"]) for h in safe if h.get("ViewPosition")}) or None,
                 deidentified=True)


def _representatives(members: list[tuple[Path, dict]]) -> list[tuple[Path, dict]]:
    """All images of projection studies; the middle slice of each multi-slice volume series."""
    by_series: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for p, h in members:
        by_series[str(h.get("SeriesInstanceUID", p))].append((p, h))
    chosen = []
    for series in by_series.values():
        if len(series) > 2 and series[0][1].get("Modality") in VOLUME_MODALITIES:
            series.sort(key=lambda m: as_int(m[1].get("InstanceNumber")))
            chosen.append(series[len(series) // 2])
        else:
            chosen.extend(sorted(series, key=lambda m: str(m[0])))
    return chosen


def _walk(folder: Path) -> list[Path]:
    """Every file below ``folder``, following directory links (PACS exports often use them)."""
    out: list[Path] = []
    for dirpath, _, files in os.walk(folder, followlinks=True):
        out.extend(Path(dirpath) / f for f in files)
    return sorted(out)
