"""Graded similarity from radiologists' scores: does retrieval find cases of like severity?

The notes set carries, for some images, the mean of three radiologists' severity scores
(``severity_extent`` 0-8: how much of the lungs is involved; ``severity_opacity`` 0-6: how dense;
Cohen et al. 2020). Unlike a label set these are *graded*: a query scored 7/5 is closer to a 6/4
case than to a 1/1 case, which label agreement cannot say. Two scored images agree by

    g = 1 - mean over their shared score keys of |a - b| / range

(range: the scale's span, 8 and 6 for the two scores above, else the span seen in the folder).

Per scored query, the gallery is the scored images of *other* patients (a patient's own
follow-ups would be trivially alike), ranked by the method's similarity; the query's value is
the mean g of its top ``k``. Per-query values, NaN for queries without scores, join the other
per-query metrics so the same paired bootstrap gives the intervals. Few images carry scores (17
in the shared set), so the intervals are wide; the point is that the measure exists and any
folder with more scored images gets it for free.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from retrieval.records import Study

SCORE_RANGES = {"severity_extent": 8.0, "severity_opacity": 6.0}  # the published scales' spans
GRADED_K = 3  # top k of a gallery of ~10-15 other patients' scored images


def score_table(studies: Sequence[Study]) -> tuple[list[str], np.ndarray]:
    """The score keys present and an (n, keys) matrix, NaN where a study lacks that score."""
    keys = sorted({k for s in studies for k in (s.scores or {})})
    table = np.full((len(studies), len(keys)), np.nan)
    for i, s in enumerate(studies):
        for j, k in enumerate(keys):
            if s.scores and k in s.scores:
                table[i, j] = s.scores[k]
    return keys, table


def grade_matrix(studies: Sequence[Study]) -> np.ndarray:
    """(n, n) graded agreement g in [0, 1]; NaN where either study has no score in common."""
    keys, table = score_table(studies)
    n = len(studies)
    if not keys:
        return np.full((n, n), np.nan)
    span = np.array([SCORE_RANGES.get(k) or (np.nanmax(table[:, j]) - np.nanmin(table[:, j]) or 1.0)
                     for j, k in enumerate(keys)])
    diff = np.abs(table[:, None, :] - table[None, :, :]) / span  # (n, n, keys), NaN where missing
    with warnings.catch_warnings():  # pairs sharing no score: nanmean of nothing is NaN, as wanted
        warnings.simplefilter("ignore", RuntimeWarning)
        return 1.0 - np.nanmean(diff, axis=2)


def _gallery(studies: Sequence[Study], grades: np.ndarray) -> np.ndarray:
    """(n, n) bool: j is in i's gallery (both scored, different patients, not i itself)."""
    pid = np.array([s.patient_id or f"study:{s.study_id}" for s in studies])
    return np.isfinite(grades) & (pid[:, None] != pid[None, :])


def graded_at_k(studies: Sequence[Study], scores: np.ndarray, k: int = GRADED_K,
                grades: np.ndarray | None = None) -> np.ndarray:
    """Per query: mean g of the top ``k`` of its gallery by ``scores``; NaN without a gallery of k."""
    g = grade_matrix(studies) if grades is None else grades
    ok = _gallery(studies, g)
    out = np.full(len(studies), np.nan)
    for i in np.flatnonzero(ok.sum(1) >= k):
        cand = np.flatnonzero(ok[i])
        top = cand[np.argsort(-scores[i, cand], kind="stable")[:k]]
        out[i] = g[i, top].mean()
    return out


def graded_bounds(studies: Sequence[Study], k: int = GRADED_K) -> dict[str, float | int]:
    """What a ranking could get: the best top-k (oracle) and a random one (the gallery's mean g)."""
    g = grade_matrix(studies)
    ok = _gallery(studies, g)
    rows = [i for i in range(len(studies)) if ok[i].sum() >= k]
    if not rows:
        return {"queries": 0}
    best = [np.sort(g[i, ok[i]])[::-1][:k].mean() for i in rows]
    mean = [g[i, ok[i]].mean() for i in rows]
    return {"queries": len(rows), "k": k, "oracle": float(np.mean(best)), "random_expected": float(np.mean(mean))}
