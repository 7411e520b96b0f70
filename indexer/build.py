"""Build an index from a manifest: read -> decode -> mine entities -> encode -> write -> publish.

Bad input never stops a build: an unreadable image or corrupt DICOM is skipped with a message
naming the file, a study without a report is indexed without report vectors, and the end report
lists everything skipped. Nothing is visible to readers until the final atomic publish, so a
killed build leaves the previous version serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.images import ImageLoadError, load_image
from indexer.manifest import ManifestError, Study, read_manifest, resolve_image
from retrieval.encoders import create_encoder, is_joint
from retrieval.entities import EntityExtractor, report_labels
from retrieval.index import IMAGE, REPORT, REPORT_JOINT, IndexMeta, anatomy_space, open_writer
from retrieval.index.base import date_to_day
from retrieval.taxonomy import Taxonomy, default_taxonomy

log = logging.getLogger(__name__)
REPORT_SNIPPET = 4000  # characters of report kept in the payload


@dataclass(frozen=True)
class BuildConfig:
    encoder: str = "pixels"  # image encoder family (registry name)
    checkpoint: str | None = None  # local weights for the image encoder
    text_encoder: str | None = "minilm"  # report embeddings (None: no report space)
    text_checkpoint: str | None = None
    conditioning: tuple[str, ...] | None = None  # None: the taxonomy's conditioning anatomies
    index_kind: str | None = None  # flat | hnsw | ivf; None: the backend's default
    batch_size: int = 16  # images per encoder call
    device: str = "cpu"
    allow_random_init: bool = False  # medrag-native without a checkpoint (baselines only)


@dataclass
class BuildReport:
    uri: str
    version: str = ""
    studies: int = 0
    points: int = 0
    images: int = 0
    reports: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def payload_for(study: Study, image: str | None, view: str | None, tax: Taxonomy,
                extractor: EntityExtractor) -> dict[str, Any]:
    """The payload of one point: identity, metadata, report and its mined entities.

    Anatomy-finding pairs are listed for the anatomy and all its ancestors, so a filter on
    "lung:effusion" matches a report that says "left lower lobe effusion".
    """
    labels = report_labels(extractor.extract(study.report))
    present = {k for k, s in labels.items() if s == "present"}
    anyp = {k for k, s in labels.items() if s in ("present", "uncertain")}

    def expand(pairs: set[tuple[str, str]]) -> list[str]:
        return sorted({f"{a}:{f}" for anat, f in pairs for a in tax.ancestors(anat)})

    return {
        "study_id": study.study_id,
        "patient_id": study.patient_id,
        "study_date": study.study_date,
        "study_day": date_to_day(study.study_date) if study.study_date else None,
        "modality": study.modality,
        "image": image,
        "view": view,
        "report": (study.report or "")[:REPORT_SNIPPET] or None,
        "has_report": bool(study.report),
        "findings": sorted({f for _, f in present}),
        "findings_any": sorted({f for _, f in anyp}),
        "findings_absent": sorted({f for (_, f), s in labels.items() if s == "absent"}),
        "anatomy_findings": expand(present),
        "anatomy_findings_any": expand(anyp),
        "entities": [f"{a}|{f}|{s}" for (a, f), s in sorted(labels.items())],
    }


def build_index(manifest: str | Path, uri: str, cfg: BuildConfig, progress: bool = True) -> BuildReport:
    t0 = time.perf_counter()
    report = BuildReport(uri=uri)
    tax = default_taxonomy()
    extractor = EntityExtractor(tax)
    image_enc = create_encoder(cfg.encoder, checkpoint=cfg.checkpoint, device=cfg.device,
                               **({"allow_random": True} if cfg.allow_random_init else {}))
    text_enc = create_encoder(cfg.text_encoder, checkpoint=cfg.text_checkpoint, device=cfg.device) \
        if cfg.text_encoder else None
    wanted = cfg.conditioning if cfg.conditioning is not None else tax.conditioning_anatomies
    conditioning = [tax.anatomy(a).name for a in wanted]
    conditioning = [a for a in conditioning if image_enc.supports_anatomy(a)]
    spaces = {IMAGE: image_enc.dim, **{anatomy_space(a): image_enc.dim for a in conditioning}}
    if text_enc is not None:
        spaces[REPORT] = text_enc.dim
    if is_joint(image_enc):
        spaces[REPORT_JOINT] = image_enc.dim
    meta = IndexMeta(backend="", spaces=spaces, count=0, image_encoder=image_enc.describe(),
                     text_encoder=text_enc.describe() if text_enc else None, conditioning=conditioning,
                     image_root=str(Path(manifest).resolve().parent))
    errors: list[str] = []
    studies = list(read_manifest(manifest, errors=errors))
    report.skipped.extend(errors)
    writer = open_writer(uri, spaces, meta, cfg.index_kind)
    next_id = 0
    try:
        bar = _bar(len(studies), progress)
        for batch in _batches(studies, manifest, cfg.batch_size, report):
            ids = np.arange(next_id, next_id + len(batch), dtype=np.int64)
            next_id += len(batch)
            has_img = np.array([img is not None for _, _, img, _ in batch])
            imgs = [img for _, _, img, _ in batch if img is not None]
            vectors: dict[str, np.ndarray] = {}
            present: dict[str, np.ndarray] = {}
            for space, anatomy in [(IMAGE, None)] + [(anatomy_space(a), a) for a in conditioning]:
                vectors[space] = _scatter(image_enc.encode_images(imgs, anatomy=anatomy), has_img, image_enc.dim)
                present[space] = has_img
            texts = [s.report or "" for s, _, _, _ in batch]
            has_rep = np.array([bool(t.strip()) for t in texts])
            if text_enc is not None:
                vectors[REPORT] = _scatter(text_enc.encode_texts([t for t in texts if t.strip()]), has_rep, text_enc.dim)
                present[REPORT] = has_rep
            if REPORT_JOINT in spaces:
                vectors[REPORT_JOINT] = _scatter(image_enc.encode_texts([t for t in texts if t.strip()]),  # type: ignore[attr-defined]
                                                 has_rep, image_enc.dim)
                present[REPORT_JOINT] = has_rep
            payloads = [payload_for(s, rel, view, tax, extractor) for s, rel, _, view in batch]
            writer.add(ids, vectors, payloads, present)
            report.points += len(batch)
            report.images += int(has_img.sum())
            if bar is not None:
                bar.update(len({s.study_id for s, _, _, _ in batch}))
        if bar:
            bar.close()
        report.studies = len({s.study_id for s in studies}) - _fully_skipped(report)
        report.reports = sum(1 for s in studies if s.report)
        if report.points == 0:
            raise ManifestError(f"{manifest}: nothing to index ({len(report.skipped)} skipped)")
        report.version = writer.commit()
    except BaseException:
        writer.abort()
        raise
    report.seconds = time.perf_counter() - t0
    return report


def _fully_skipped(report: BuildReport) -> int:
    return sum(1 for s in report.skipped if s.startswith("study ") and s.endswith("no readable image"))


def _scatter(rows: np.ndarray, mask: np.ndarray, dim: int) -> np.ndarray:
    out = np.zeros((len(mask), dim), dtype=np.float32)
    if mask.any():
        out[mask] = rows
    return out


def _batches(studies: list[Study], manifest: str | Path, size: int,
             report: BuildReport) -> Iterator[list[tuple[Study, str | None, np.ndarray | None, str | None]]]:
    """Yield (study, image path, pixels, view) points; report-only studies give one point."""
    batch: list[tuple[Study, str | None, np.ndarray | None, str | None]] = []
    for study in studies:
        points: list[tuple[Study, str | None, np.ndarray | None, str | None]] = []
        for i, rel in enumerate(study.images):
            try:
                pixels = load_image(resolve_image(manifest, rel), name=rel)
            except ImageLoadError as exc:
                report.skipped.append(str(exc))
                continue
            view = study.view[i] if study.view and i < len(study.view) else None
            points.append((study, rel, pixels, view))
        if not points:
            if study.report and not study.images:
                points.append((study, None, None, None))
            else:
                report.skipped.append(f"study {study.study_id}: no readable image")
                continue
        batch.extend(points)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="study", desc="indexing", dynamic_ncols=True)
