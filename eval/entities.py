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
from typing import Any

import msgspec

from retrieval.entities import EntityExtractor, coarse_labels
from retrieval.records import Label, as_labels
from retrieval.taxonomy import default_taxonomy


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


def predicted_labels(report: str, extractor: EntityExtractor) -> set[Label]:
    return set(as_labels(coarse_labels(extractor.extract(report), extractor.tax)))


def parse_gold(label: str) -> Label:
    """A gold label as written in the fixture file: ``anatomy|finding|status``."""
    anatomy, finding, status = label.split("|")
    return msgspec.convert({"anatomy": anatomy, "finding": finding, "status": status}, Label)


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
        g, p = {parse_gold(x) for x in labels}, predicted_labels(texts[rid], ex)
        _add(full, g, p)
        _add(loose, {_drop_anatomy(x) for x in g}, {_drop_anatomy(x) for x in p})
        if g != p:
            errors[rid] = {"missed": [_show(x) for x in sorted(g - p)], "spurious": [_show(x) for x in sorted(p - g)]}
    return {
        "reports": len(gold),
        "labels": sum(len(v) for v in gold.values()),
        "anatomy_finding_status": PRF(*full).as_dict(),
        "finding_status": PRF(*loose).as_dict(),
        "errors": errors,
    }


def _drop_anatomy(label: Label) -> tuple[str, str]:
    return (label.finding, label.status)


def _show(label: Label) -> str:
    return f"{label.anatomy}|{label.finding}|{label.status}"  # the fixture file's notation


def _add(acc: list[int], gold: set[Any], pred: set[Any]) -> None:
    acc[0] += len(gold & pred)
    acc[1] += len(pred - gold)
    acc[2] += len(gold - pred)
