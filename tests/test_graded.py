"""Severity as a graded similarity (eval/graded.py): arithmetic, the gallery, and the eval rows.

Issue 12 item 5: the notes set's radiologists' severity scores are a real graded similarity; a
ranking that follows them must score the oracle bound and one that inverts them must score low.
The shared set's 17 scored images (12 patients) are read in place.
"""

from __future__ import annotations

import numpy as np
import pytest

from eval.graded import grade_matrix, graded_at_k, graded_bounds
from eval.labelled import CxrEvalConfig, format_table, score_methods, summarise
from indexer.sources.labelled import from_notes_csv
from retrieval.records import Study

from .conftest import SHARED

COVID = SHARED / "data" / "covid_cxr_notes"


def _study(i: int, patient: str, extent: float | None, opacity: float | None = None) -> Study:
    scores = {k: v for k, v in (("severity_extent", extent), ("severity_opacity", opacity)) if v is not None}
    return Study(study_id=f"s{i}", patient_id=patient, report="Clear lungs.", scores=scores or None)


def test_grade_is_one_minus_the_mean_scaled_difference_over_shared_scores():
    s = [_study(0, "a", 8.0, 6.0), _study(1, "b", 4.0, 0.0), _study(2, "c", 0.0), _study(3, "d", None)]
    g = grade_matrix(s)
    assert g[0, 1] == pytest.approx(1 - (4 / 8 + 6 / 6) / 2)
    assert g[0, 2] == pytest.approx(1 - 8 / 8)  # only extent is shared
    assert g[1, 2] == pytest.approx(1 - 4 / 8)
    assert np.isnan(g[0, 3]) and np.isnan(g[3, 3]) and g[1, 1] == 1.0


def test_the_gallery_leaves_out_the_patients_own_images_and_unscored_ones():
    s = [_study(0, "a", 8.0), _study(1, "a", 8.0), _study(2, "b", 7.0), _study(3, "c", 0.0), _study(4, "d", None)]
    scores = np.array([[0, 9, 1, 2, 9]] * 5, float)  # every query prefers s1 and the unscored s4
    got = graded_at_k(s, scores, k=1)
    # query 0 may not take its own follow-up s1 nor unscored s4: its top is s3 (score 2), g = 0
    assert got[0] == pytest.approx(0.0)
    assert got[2] == pytest.approx(1 - 1 / 8)  # query 2's top is s1 (patient a, 8.0)
    assert np.isnan(got[4])


def test_on_the_shared_scored_images_the_grades_themselves_reach_the_oracle_and_their_inverse_does_not(tmp_path):
    res = from_notes_csv(COVID, tmp_path)
    scored = [s for s in res.studies if s.scores]
    assert len(scored) == 17 and len({s.patient_id for s in scored}) == 12
    g = np.nan_to_num(grade_matrix(scored))
    bounds = graded_bounds(scored, 3)
    best, worst = graded_at_k(scored, g, 3), graded_at_k(scored, -g, 3)
    assert bounds["queries"] == 17
    assert np.nanmean(best) == pytest.approx(bounds["oracle"])
    assert np.nanmean(worst) < bounds["random_expected"] < bounds["oracle"]
    rng = np.random.default_rng(0)
    rand = np.mean([np.nanmean(graded_at_k(scored, rng.random((17, 17)), 3)) for _ in range(200)])
    assert rand == pytest.approx(bounds["random_expected"], abs=0.01)


def test_the_eval_prints_severity_rows_with_paired_intervals_when_a_folder_has_scores():
    studies = [_study(i, f"p{i}", float(i % 9), float(i % 7)) for i in range(12)] + [_study(12, "p12", None)]
    ext = np.array([i % 9 for i in range(12)] + [4], float)
    feats = {"by severity": np.stack([np.cos(ext / 6), np.sin(ext / 6)], 1),  # close severities: close vectors
             "against it": np.stack([np.cos(-ext), np.sin(-ext)], 1)}
    methods = {m: (lambda ims, f=f: f) for m, f in feats.items()}
    cfg = CxrEvalConfig(k=3, findings=("Effusion",), bootstrap=200)
    per, has, _ = score_methods(studies, [np.zeros((8, 8))] * 13, methods, cfg)
    assert np.isnan(per["by severity"].graded[12]) and np.isfinite(per["by severity"].graded[:12]).all()
    summary = summarise(per, has, cfg, "by severity")
    assert summary["methods"]["by severity"]["graded@k"] > summary["methods"]["against it"]["graded@k"]
    summary.update(k=3, graded=graded_bounds(studies))
    text = format_table(summary)
    assert "severity agreement@3" in text and "by severity - against it: +" in text
