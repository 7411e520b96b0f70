"""The draft consistency checker: each rule on sentences written for these tests, and repair."""

from retrieval.rag import ContextBuilder, ExtractiveGenerator
from retrieval.rag.consistency import ConsistencyChecker
from retrieval.rag.prompting import build_prompt, parse_generated
from retrieval.rag.types import Draft, DraftSentence


def _d(findings=(), comparison=(), impression=()):
    s = lambda xs: [DraftSentence(x, ("c1",)) for x in xs]  # noqa: E731
    return Draft(findings=s(findings), interval_changes=s(comparison), impression=s(impression))


def _rules(draft):
    return sorted(c.rule for c in ConsistencyChecker().check(draft))


def test_normal_statement_against_a_finding_in_a_part():
    d = _d(findings=["The lungs are clear.", "Heart size is normal."], impression=["Possible nodule (right lung)."])
    assert "normal-vs-finding" in _rules(d)
    assert _rules(_d(findings=["The lungs are otherwise clear.", "Calcified granuloma in the left upper lobe."])) == []


def test_present_against_absent_and_siblings_are_fine():
    assert _rules(_d(findings=["No pleural effusion.", "Small left pleural effusion."])) == ["present-vs-absent"]
    assert _rules(_d(findings=["No right pleural effusion.", "Small left pleural effusion."])) == []


def test_comparison_against_findings_and_unsupported_impression():
    d = _d(findings=["Small left pleural effusion."], comparison=["Interval resolution of the left pleural effusion."],
           impression=["Small left pleural effusion.", "Right upper lobe mass."])
    assert _rules(d) == ["comparison-vs-findings", "impression-unsupported"]
    # a diagnosis is supported by a finding in a related anatomy
    assert _rules(_d(findings=["Right lower lobe consolidation."], impression=["Pneumonia."])) == []


def test_repair_deletes_the_negative_side_and_keeps_citations():
    d = _d(findings=["The lungs are clear.", "Right lower lobe opacity."], impression=["Right lower lobe opacity."])
    fixed, found = ConsistencyChecker().repair(d)
    assert found and ConsistencyChecker().check(fixed) == []
    assert [s.text for s in fixed.findings] == ["Right lower lobe opacity."]
    assert all(s.citations == ("c1",) for s in fixed.sentences())


def test_extractive_drafts_are_consistent_and_model_drafts_are_flagged():
    ctx = ContextBuilder().build([("a", 0.9, "The lungs are clear. Small right upper lobe nodule. Heart size is normal."),
                                  ("b", 0.8, "Right upper lobe nodule. The lungs are clear."),
                                  ("c", 0.7, "The lungs are clear. No effusion.")])
    assert ConsistencyChecker().check(ExtractiveGenerator().generate(ctx)) == []
    prompt = build_prompt(ctx)
    assert "(similarity 0.90)" in prompt and "Entity consensus" in prompt and "nodule" in prompt
    model_text = "FINDINGS:\nThe lungs are clear. [a]\nPossible right upper lobe nodule. [a, b]\nIMPRESSION:\nNodule. [b]"
    draft = parse_generated(model_text, ctx, "test-model")
    assert draft.contradictions and "normal-vs-finding" in draft.contradictions[0]
    assert "CHECK" in draft.render() and draft.findings[1].citations == ("a", "b")
