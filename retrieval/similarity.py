"""Report-mined similarity between studies, overall and per anatomy (RadIR-style ground truth).

For a study's report, every (anatomy, finding) statement has a status: present = 1,
uncertain = 0.5, absent = 0 (:mod:`retrieval.entities`). For anatomy ``a`` the *relevant*
statements are those about ``a``, any part below it, or any part above it except the root
("the lungs are clear" speaks about the left lung too; "chest|support device" does not). Per
report and finding, the relevant statements collapse to the highest status.

    s_a(i, j) = mean over f in F_a(i) ∪ F_a(j) of  1 - |x_i(f) - x_j(f)|

where F_a(r) is the set of findings report r states (in any status) about ``a``, and a finding one
report does not mention counts as absent there (reports list positives, not every negative).
Two reports that both say nothing about ``a`` agree fully (s_a = 1): both describe it as normal;
evaluation drops such queries because they carry no information (see ``eval/retrieval.py``).
The unconditioned score s uses the same formula over keys (coarse anatomy, finding), so a left
effusion and a right effusion are different findings overall.

So "no effusion" agrees with "no effusion" (both 0), "small effusion" vs "possible effusion" is
0.5, and "effusion" vs a report silent about the pleura is 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.entities import EntityExtractor, report_labels, study_labels
from retrieval.records import STATUS_VALUE, LabelKey, Status, Study
from retrieval.taxonomy import Taxonomy, default_taxonomy


def relevant_anatomies(anatomy: str, tax: Taxonomy) -> set[str]:
    root = tax.ancestors(anatomy)[-1]
    return set(tax.descendants(anatomy)) | (set(tax.ancestors(anatomy)) - {root})


class ReportMatrix:
    """Reports as a (n, keys) matrix of finding values, with a mask of what each report states.

    Build it once per corpus; :meth:`similarity` then gives s for any anatomy as a dense matrix.
    """

    def __init__(self, reports: Sequence[str | None], taxonomy: Taxonomy | None = None,
                 extractor: EntityExtractor | None = None,
                 labels: Sequence[dict[LabelKey, Status]] | None = None) -> None:
        self.tax = taxonomy or default_taxonomy()
        if labels is not None:
            self.labels = list(labels)
        else:
            ex = extractor or EntityExtractor(self.tax)
            self.labels = [report_labels(ex.extract(r)) for r in reports]

    @classmethod
    def from_studies(cls, studies: Sequence[Study], taxonomy: Taxonomy | None = None) -> ReportMatrix:
        """Ground-truth labels where a study has them, mined report labels otherwise.

        With labels that list positives only (NIH: "Effusion|Mass"), s over label keys is exactly
        the Jaccard index of the two label sets, and two normal studies agree fully (s = 1)."""
        tax = taxonomy or default_taxonomy()
        ex = EntityExtractor(tax)
        return cls([], tax, labels=[study_labels(s, ex) for s in studies])

    def values(self, anatomy: str | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(values, stated-mask, keys) for ``anatomy`` (None: all anatomies, coarse keys)."""
        rel = relevant_anatomies(self.tax.anatomy(anatomy).name, self.tax) if anatomy else None
        rows: list[dict[str, float]] = []
        for labels in self.labels:
            row: dict[str, float] = {}
            for (anat, finding), status in labels.items():
                if rel is not None and anat not in rel:
                    continue
                key = finding if rel is not None else f"{self.tax.coarse(anat)}|{finding}"  # a column name
                row[key] = max(row.get(key, -1.0), STATUS_VALUE[status])
            rows.append(row)
        keys = sorted({k for r in rows for k in r})
        col = {k: c for c, k in enumerate(keys)}
        vals = np.zeros((len(rows), len(keys)), np.float32)
        mask = np.zeros((len(rows), len(keys)), bool)
        for i, r in enumerate(rows):
            for k, v in r.items():
                vals[i, col[k]] = v
                mask[i, col[k]] = True
        return vals, mask, keys

    def informative(self, anatomy: str | None) -> np.ndarray:
        """Reports that state anything about ``anatomy`` (queries worth evaluating)."""
        _, mask, _ = self.values(anatomy)
        return np.asarray(mask.any(1)) if mask.size else np.zeros(len(self.labels), bool)

    def similarity(self, anatomy: str | None = None, rows: np.ndarray | None = None) -> np.ndarray:
        """s_a for ``rows`` (default all) against all reports: float32 (len(rows), n)."""
        vals, mask, _ = self.values(anatomy)
        rows = np.arange(len(self.labels)) if rows is None else np.asarray(rows)
        return agreement(vals[rows], mask[rows], vals, mask)


def agreement(vals_a: np.ndarray, mask_a: np.ndarray, vals_b: np.ndarray, mask_b: np.ndarray) -> np.ndarray:
    """The s_a formula itself, for (n_a, F) and (n_b, F) value/stated-mask matrices: (n_a, n_b).

    The one implementation of s_a (training targets, evaluation ground truth and the similarity
    API all call it), so the quantity a model is trained on is exactly the one it is scored on.
    """
    na, nb = len(vals_a), len(vals_b)
    if vals_a.shape[1] == 0:
        return np.ones((na, nb), np.float32)
    agree = np.zeros((na, nb), np.float32)
    union = np.zeros((na, nb), np.float32)
    for f in range(vals_a.shape[1]):
        u = mask_a[:, f, None] | mask_b[None, :, f]
        union += u
        agree += u * (1.0 - np.abs(vals_a[:, f, None] - vals_b[None, :, f]))
    out = np.ones_like(agree)
    np.divide(agree, union, out=out, where=union > 0)
    return out


def pair_similarity(report_a: str | None, report_b: str | None, anatomy: str | None = None) -> float:
    """s_a between two reports (convenience; use :class:`ReportMatrix` for corpora)."""
    return float(ReportMatrix([report_a, report_b]).similarity(anatomy, np.array([0]))[0, 1])
