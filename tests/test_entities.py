import pytest

from eval.entities import score
from retrieval.entities import EntityExtractor, report_labels, split_sentences
from retrieval.taxonomy import UnknownTermError, default_taxonomy

from .conftest import ROOT


@pytest.fixture(scope="module")
def ex():
    return EntityExtractor()


def labels(ex, text):
    return {f"{a}|{f}|{s}" for (a, f), s in report_labels(ex.extract(text)).items()}


def test_negation_lists_and_clause_breaks(ex):
    got = labels(ex, "No focal consolidation, pleural effusion or pneumothorax, but there is left basilar atelectasis.")
    assert {"lung|consolidation|absent", "pleura|effusion|absent", "pleura|pneumothorax|absent",
            "left lower lobe|atelectasis|present"} <= got


def test_uncertainty_and_laterality(ex):
    got = labels(ex, "Small left pleural effusion. Right lower lobe opacity may represent pneumonia.")
    assert "left pleura|effusion|present" in got
    assert "right lower lobe|opacity|present" in got
    assert "right lower lobe|pneumonia|uncertain" in got


def test_bibasilar_and_normal_statements(ex):
    got = labels(ex, "Bibasilar atelectasis. The heart size is normal. The lungs are otherwise clear.")
    assert {"left lower lobe|atelectasis|present", "right lower lobe|atelectasis|present",
            "heart|cardiomegaly|absent", "lung|opacity|absent"} <= got


def test_pseudo_negation_is_not_negation(ex):
    assert "heart|cardiomegaly|present" in labels(ex, "No change in moderate cardiomegaly.")


def test_empty_and_missing_reports(ex):
    assert ex.extract(None) == [] and ex.extract("   ") == []


def test_sentence_split_keeps_decimals():
    sents = split_sentences("Nodule measures 1.5 cm. 1. No effusion. 2. Stable.")
    assert [s.text for s in sents] == ["Nodule measures 1.5 cm", "No effusion", "Stable"]


def test_taxonomy_hierarchy_and_unknown_terms():
    tax = default_taxonomy()
    assert tax.ancestors("left lower lobe") == ["left lower lobe", "left lung", "lung", "chest"]
    assert tax.lateral("pleura", "left") == "left pleura"
    assert tax.anatomy("lungs").name == "lung"
    with pytest.raises(UnknownTermError, match="Did you mean: left lung"):
        tax.anatomy("left lunq")


def test_against_hand_checked_iu_xray_reports(iu_annotation):
    """50 IU X-ray reports labelled by hand (tests/fixtures/iu_xray_gold50.json)."""
    r = score(ROOT / "tests" / "fixtures" / "iu_xray_gold50.json", iu_annotation)
    assert r["reports"] == 50 and r["labels"] >= 300
    fs, afs = r["finding_status"], r["anatomy_finding_status"]
    assert fs["precision"] >= 0.95 and fs["recall"] >= 0.85, fs
    assert afs["precision"] >= 0.90 and afs["recall"] >= 0.80, afs
