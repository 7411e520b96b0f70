"""Drafting from the image: the findings table, the structured drafter, the safety checker/gate."""

from __future__ import annotations

import numpy as np

from indexer.reading import thresholds
from retrieval.encoders.reading import FindingProbability, FindingReading
from retrieval.rag.findings import AnalogCase, build_table
from retrieval.rag.safety import SafetyChecker, gate, patient_specific, strip_sides
from retrieval.rag.structured import StructuredGenerator
from retrieval.rag.types import Draft, DraftContext, DraftSentence
from retrieval.records import ABSENT, PRESENT, LabelKey

EFF, CARDIO = LabelKey("pleura", "effusion"), LabelKey("heart", "cardiomegaly")


def _reading(eff: float, cardio: float = 0.05) -> FindingReading:
    return FindingReading({EFF: FindingProbability(EFF, eff, 0.3, 0.7, 0.05),
                           CARDIO: FindingProbability(CARDIO, cardio, 0.3, 0.7, 0.05)})


def _draft(table):
    return StructuredGenerator().generate(DraftContext((), table=table))


def test_side_comes_from_the_query_not_from_the_cases():
    # every analog case says "right" effusion; the image reads an effusion and no side
    cases = [AnalogCase(f"c{i}", 0.9, {EFF: PRESENT}) for i in range(3)]
    d = _draft(build_table(_reading(0.9), cases))
    text = " ".join(s.text for s in d.sentences())
    assert "effusion" in text.lower() and "right" not in text.lower() and "left" not in text.lower()
    assert "Heart size is normal." in text
    assert SafetyChecker().check(d, d.table).issues == []
    eff = next(s for s in d.findings if "effusion" in s.text.lower())
    assert eff.evidence is not None and eff.evidence.image[0][0] == "pleura|effusion" and len(eff.evidence.cases) == 3


def test_prior_side_is_used_only_when_the_reading_agrees():
    cases = [AnalogCase("c0", 0.9, {EFF: PRESENT})]
    yes = _draft(build_table(_reading(0.9), cases, prior_reading=_reading(0.1), prior_labels={EFF: PRESENT},
                             prior_sides={EFF: "left"}, prior_study="p1"))
    assert any("left pleural effusion" in s.text.lower() for s in yes.findings)
    no = _draft(build_table(_reading(0.02), [AnalogCase("c0", 0.9, {EFF: ABSENT})], prior_reading=_reading(0.9),
                            prior_labels={EFF: PRESENT}, prior_sides={EFF: "left"}, prior_study="p1"))
    assert not any("left" in s.text.lower() for s in no.findings)
    assert [c.change for c in no.table.changes if c.key == EFF] == ["resolved"]


def test_cases_alone_never_decide_interval_change():
    t = build_table(None, [AnalogCase("c0", 0.9, {EFF: PRESENT})], prior_labels={EFF: ABSENT}, prior_study="p")
    assert t.changes == []


def test_nothing_to_draft_is_said_plainly():
    d = _draft(build_table(None, []))
    assert d.status == "nothing_to_draft" and "nothing to draft" in d.render()


def test_checker_counts_other_patients_details_and_the_gate_removes_them():
    table = build_table(_reading(0.9), [AnalogCase("c0", 0.9, {EFF: PRESENT})])
    bad = Draft(findings=[DraftSentence("A 61-year-old male with fever (38.3.", ("c0",)),
                          DraftSentence("Moderate right pleural effusion.", ("c0",)),
                          DraftSentence("(Figs.", ("c0",)),
                          DraftSentence("COP may explain the reduced lung volumes.", ("c0",))])
    kinds = SafetyChecker().check(bad, table).counts()
    assert kinds["patient"] >= 3 and kinds["side_unsupported"] == 1 and kinds["fragment"] >= 1
    gated = gate(bad, table)
    assert [s.text for s in gated.findings] == ["Moderate pleural effusion."]
    assert SafetyChecker().check(gated, table).issues == []
    assert patient_specific("The lungs are clear.") == []
    assert strip_sides("Small left pleural effusion.") == "Small pleural effusion."


def test_thresholds_follow_out_of_fold_scores():
    p = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.05, 0.6, 0.65, 0.3, 0.85])
    y = np.array([1, 1, 1, 0, 0, 0, 1, 1, 0, 1])
    u, pr = thresholds(p, y)
    assert u == 0.6 and pr == 0.6  # separable: the best F1 cut is also precise enough


def test_noise_variants_keep_laterality_and_measure_spread():
    from indexer.reading import acquisition_variants, noise_sd
    from retrieval.encoders.reading import LabelCalibration

    img = np.zeros((64, 64), np.float32)
    img[:, :20] = 0.8  # bright on the image's left
    vs = acquisition_variants(img)
    assert len(vs) == 4 and all(v.shape == img.shape for v in vs) and np.array_equal(vs[0], img)
    assert all(v[:, :16].mean() > v[:, -16:].mean() for v in vs)  # never flipped
    cal = LabelCalibration("pleura|effusion", 1.0, 0.0, 0.3, None, 0.0)
    still = np.zeros((3, 4, 1))
    moving = np.array([[[-2.0], [0.0], [2.0], [0.0]]] * 3)
    assert noise_sd(still, [cal])[0] == 0.0 and noise_sd(moving, [cal])[0] > 0.2
