"""The IU X-ray / MIMIC-CXR ``annotation.json`` layout of R2Gen, with an images root.

``{"train": [...], "val": [...], "test": [...]}``, items ``{"id", "report", "image_path":
[...], "split"}`` (MIMIC items also carry ``subject_id`` and ``study_id``). Image paths resolve
against ``images_root``. With ``require_images=False`` a study whose images are absent is kept
with its report only (report-only mode: text retrieval and evaluation without pixels).
"""

from __future__ import annotations

import json
from pathlib import Path

from indexer.manifest import relative_to_manifest
from indexer.sources import SourceResult
from retrieval.records import Study


def from_r2gen(annotation: str | Path, images_root: str | Path | None, manifest_path: str | Path,
               splits: tuple[str, ...] = ("train", "val", "test"), require_images: bool = True,
               modality: str = "CR") -> SourceResult:
    raw = json.loads(Path(annotation).read_text(encoding="utf-8"))
    out = SourceResult()
    root = Path(images_root) if images_root else None
    if root is None and require_images:
        raise ValueError("an images root is needed unless require_images=False (report-only mode)")
    for split in splits:
        for item in raw.get(split, []):
            sid = str(item.get("study_id") or item.get("id") or "").strip()
            if not sid:
                out.skipped.append(f"{annotation}: item without id in split {split}")
                continue
            images: list[str] = []
            if root is not None:
                for rel in item.get("image_path", []):
                    p = root / rel
                    if p.is_file():
                        images.append(relative_to_manifest(manifest_path, p))
                    elif require_images:
                        out.skipped.append(f"{p}: image of study {sid} not found")
            if require_images and not images:
                out.skipped.append(f"study {sid}: no image found under {root}")
                continue
            report = (item.get("report") or "").strip() or None
            subject = item.get("subject_id")
            out.studies.append(Study(study_id=sid, images=images, report=report,
                                     patient_id=str(subject) if subject is not None else None,
                                     modality=modality))
    return out
