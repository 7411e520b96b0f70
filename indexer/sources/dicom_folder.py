"""A folder of DICOM files, grouped into studies by StudyInstanceUID.

Only headers are read here (fast). Identifiers are pseudonymised before they reach the manifest:
study and patient ids become keyed hashes (HMAC-SHA256 with ``MEDRAG_PHI_KEY``), so the index
can group a patient's studies without holding the real ids. Volumes (a CT/MR series of many
single-frame slices) contribute their middle slice, since retrieval here is 2D. Reports come
from an optional CSV keyed by ``StudyInstanceUID`` or ``AccessionNumber`` (column ``report``).
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
from collections import defaultdict
from pathlib import Path

from indexer.dicom import DicomDecodeError, as_int, read_header
from indexer.manifest import Study, relative_to_manifest
from indexer.sources import SourceResult

log = logging.getLogger(__name__)
_DEFAULT_KEY = "medrag-default-key-set-MEDRAG_PHI_KEY"
VOLUME_MODALITIES = {"CT", "MR", "PT", "NM"}


def pseudonym(value: str, kind: str) -> str:
    """Keyed, stable, non-reversible id (``kind`` keeps study and patient namespaces apart)."""
    key = os.environ.get("MEDRAG_PHI_KEY", _DEFAULT_KEY).encode()
    return hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()[:20]


def _date(value: str | None) -> str | None:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return None


def from_dicom_folder(folder: str | Path, manifest_path: str | Path,
                      reports_csv: str | Path | None = None) -> SourceResult:
    folder = Path(folder)
    out = SourceResult()
    if os.environ.get("MEDRAG_PHI_KEY") is None:
        log.warning("MEDRAG_PHI_KEY is not set: pseudonyms use a public default key")
    reports: dict[str, str] = {}
    if reports_csv:
        with open(reports_csv, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                key = (row.get("StudyInstanceUID") or row.get("AccessionNumber") or "").strip()
                if key and (row.get("report") or "").strip():
                    reports[key] = row["report"].strip()
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
        studies[str(uid)].append((path, head))
    for uid, members in studies.items():
        chosen = _representatives(members)
        first = chosen[0][1]
        out.studies.append(Study(
            study_id=pseudonym(uid, "study"),
            images=[relative_to_manifest(manifest_path, p) for p, _ in chosen],
            report=reports.get(uid) or reports.get(str(first.get("AccessionNumber", ""))) or None,
            patient_id=pseudonym(str(first["PatientID"]), "patient") if first.get("PatientID") else None,
            study_date=_date(first.get("StudyDate")),
            modality=first.get("Modality"),
            view=sorted({str(h["ViewPosition"]) for _, h in chosen if h.get("ViewPosition")}) or None,
        ))
    return out


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
