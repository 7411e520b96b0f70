"""Same-class retrieval on a folder whose labels name one class per image (Kermany: normal,
bacterial or viral pneumonia).

``labels.csv`` with a ``pathogen`` column (the Kermany layout of the shared data): the class is
``normal`` for "No Finding" without a pathogen, ``bacterial`` / ``viral`` for "Pneumonia" with
pathogen ``bacteria`` / ``virus``. Any other combination is an unknown class: the row is named in
the problems, its image stays in the gallery (it can never be a same-class hit) and is no query.
Same-class precision@k per class, against the class's base rate, is printed by ``medrag eval cxr``
beside the finding table, with paired-bootstrap intervals of the trained checkpoint minus each
baseline.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval.records import Study

CLASSES = ("normal", "bacterial", "viral")
_PATHOGEN = {"bacteria": "bacterial", "bacterial": "bacterial", "virus": "viral", "viral": "viral"}


def study_classes(folder: str | Path, studies: Sequence[Study]) -> tuple[np.ndarray | None, list[str]]:
    """(n,) class name per study ('' where unknown), or None when the folder has no class column."""
    path = Path(folder) / "labels.csv"
    if not path.is_file():
        return None, []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if "pathogen" not in (reader.fieldnames or []):
            return None, []
        by_stem: dict[str, str] = {}
        problems: list[str] = []
        for n, row in enumerate(reader, start=2):
            label = (row.get("labels") or "").strip().lower()
            pathogen = (row.get("pathogen") or "").strip().lower()
            cls = ""
            if label == "no finding" and not pathogen:
                cls = "normal"
            elif label == "pneumonia" and pathogen in _PATHOGEN:
                cls = _PATHOGEN[pathogen]
            else:
                problems.append(f"{path.name} row {n}: unknown class (labels {row.get('labels')!r}, pathogen "
                                f"{row.get('pathogen')!r}); left out of the class table")
            by_stem[Path(row.get("image") or "").stem] = cls
    return np.array([by_stem.get(s.study_id, "") for s in studies], dtype=object), problems


def class_precision(scores: np.ndarray, classes: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per class: (n,) same-class precision@k of each query of that class (NaN for the others);
    the query itself excluded."""
    sc = scores.astype(np.float64).copy()
    np.fill_diagonal(sc, -np.inf)
    top = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    same = classes[top] == classes[:, None]
    prec = same.mean(1)
    return {c: np.where(classes == c, prec, np.nan) for c in CLASSES if (classes == c).any()}


def class_base_rates(classes: np.ndarray) -> dict[str, float]:
    """What a random ranking gets: (count - 1) / (n - 1) per class."""
    n = len(classes)
    return {c: float(((classes == c).sum() - 1) / max(n - 1, 1)) for c in CLASSES if (classes == c).any()}
