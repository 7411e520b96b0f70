"""Precision/recall of the report entity extractor against hand-checked labels.

The gold file holds report ids and labels only (the report texts stay in ``../shared/data`` under
their licence); this module joins them, runs the extractor and scores at two granularities:
``finding|status`` (what was said) and ``anatomy|finding|status`` with the anatomy coarsened to
organ and side (where it was said, at the resolution a "similar left lung" search uses).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from retrieval.entities import EntityExtractor, report_labels
from retrieval.taxonomy import Taxonomy, default_taxonomy

COARSE = ("left lung", "right lung", "lung", "left pleura", "right pleura", "pleura", "heart",
          "mediastinum", "diaphragm", "bones", "upper abdomen", "soft tissues", "chest")


@dataclass(frozen=True)
class PRF:
    tp: int
    fp: int
    fn: int

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float | int]:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": round(self.precision, 4),
                "recall": round(self.recall, 4), "f1": round(self.f1, 4)}


def coarse_anatomy(name: str, tax: Taxonomy) -> str:
    """Nearest ancestor of ``name`` among the organ-and-side levels in :data:`COARSE`."""
    for a in tax.ancestors(name):
        if a in COARSE:
            return a
    return "chest"


def predicted_labels(report: str, extractor: EntityExtractor) -> set[str]:
    labels = report_labels(extractor.extract(report))
    out: dict[tuple[str, str], str] = {}
    rank = {"absent": 0, "uncertain": 1, "present": 2}
    for (anatomy, finding), status in labels.items():
        key = (coarse_anatomy(anatomy, extractor.tax), finding)
        if key not in out or rank[status] > rank[out[key]]:
            out[key] = status
    return {f"{a}|{f}|{s}" for (a, f), s in out.items()}


def score(gold_path: str | Path, annotation_path: str | Path) -> dict[str, object]:
    """Score the extractor on the gold reports; returns micro P/R/F1 and per-report errors."""
    gold = json.loads(Path(gold_path).read_text())["reports"]
    ann = json.loads(Path(annotation_path).read_text())
    texts = {str(it["id"]): it["report"] for split in ann.values() for it in split}
    missing = [rid for rid in gold if rid not in texts]
    if missing:
        raise KeyError(f"gold report ids not in {annotation_path}: {missing[:5]}")
    ex = EntityExtractor(default_taxonomy())
    full = [0, 0, 0]
    loose = [0, 0, 0]
    errors = {}
    for rid, labels in gold.items():
        g, p = set(labels), predicted_labels(texts[rid], ex)
        _add(full, g, p)
        _add(loose, {_drop_anatomy(x) for x in g}, {_drop_anatomy(x) for x in p})
        if g != p:
            errors[rid] = {"missed": sorted(g - p), "spurious": sorted(p - g)}
    return {
        "reports": len(gold),
        "labels": sum(len(v) for v in gold.values()),
        "anatomy_finding_status": PRF(*full).as_dict(),
        "finding_status": PRF(*loose).as_dict(),
        "errors": errors,
    }


def _drop_anatomy(label: str) -> str:
    return label.split("|", 1)[1]


def _add(acc: list[int], gold: set[str], pred: set[str]) -> None:
    acc[0] += len(gold & pred)
    acc[1] += len(pred - gold)
    acc[2] += len(gold - pred)
