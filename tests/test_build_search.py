"""End to end on generated images with reports: manifest -> build -> search, on FAISS and Qdrant."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from api.cli import main
from indexer.build import BuildConfig, build_index
from indexer.manifest import read_manifest, write_manifest
from indexer.phi import PhiPolicy
from indexer.sources.folder import from_folder
from retrieval.entities import EntityExtractor
from retrieval.index import open_index
from retrieval.index.base import date_to_day
from retrieval.records import Label, Mention, Study
from retrieval.search import Query, Searcher, SearchError
from retrieval.taxonomy import UnknownTermError

from .conftest import save_png, synthetic_cxr

REPORTS = {
    "L": "Patchy opacity in the left lower lobe. No pleural effusion. Heart size is normal.",
    "R": "Right lower lobe opacity, possibly pneumonia. No pneumothorax.",
    "N": "The lungs are clear. No effusion or pneumothorax. Heart size is normal.",
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """24 studies (8 left opacity, 8 right, 8 normal), 2 of them with a bad input."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i in range(24):
        kind = "LRN"[i % 3]
        img = synthetic_cxr(i, left_blob=kind == "L", right_blob=kind == "R")
        save_png(root / "images" / f"st{i:02d}_frontal.png", img)
        rows.append({"study_id": f"st{i:02d}", "patient_id": f"pt{i // 2}", "study_date": f"2020-01-{i + 1:02d}",
                     "modality": "CR", "report": REPORTS[kind]})
    (root / "images" / "st03_frontal.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # corrupt image
    rows.append({"study_id": "st99", "patient_id": "pt99", "study_date": "", "modality": "CR", "report": "x"})
    rows[4]["report"] = ""  # a study without a report
    with open(root / "reports.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    res = from_folder(root / "images", root / "reports.csv", root / "manifest.jsonl")
    write_manifest(root / "manifest.jsonl", res.studies)
    return root, res


def test_folder_source_reports_what_it_skips(dataset):
    root, res = dataset
    assert len(res.studies) == 24
    assert any("st99" in s and "no image" in s for s in res.skipped)
    studies = list(read_manifest(root / "manifest.jsonl"))
    assert studies[0].images == ["images/st00_frontal.png"] and studies[4].report is None


@pytest.fixture(scope="module", params=["faiss", pytest.param("qdrant+local", marks=pytest.mark.slow)])
def built(request, dataset, tmp_path_factory):
    root, _ = dataset
    uri = f"{request.param}:{tmp_path_factory.mktemp('ix')}/index"
    rep = build_index(root / "manifest.jsonl", uri, BuildConfig(encoder="pixels", index_kind="flat"), progress=False)
    return root, uri, rep


def test_build_skips_bad_input_and_keeps_the_rest(built):
    _, uri, rep = built
    assert rep.points == 23 and rep.studies == 23 and rep.version == "v000001"
    assert any("st03_frontal.png" in s and "corrupt" in s for s in rep.skipped)
    meta = open_index(uri).meta
    assert {"image", "report", "image@left lung", "image@heart"} <= set(meta.spaces)
    assert meta.image_encoder["family"] == "pixels"


def test_payload_carries_mined_entities(built):
    _, uri, _ = built
    p = open_index(uri).find(_sid("st00"))[0].payload
    assert Label("left lower lobe", "opacity", "present") in p.entities
    assert "lung:opacity" in p.anatomy_findings and "left lung:opacity" in p.anatomy_findings
    # the stored date is shifted by the patient's offset (issue 23): 2020-01-01 of patient pt0
    shifted = PhiPolicy.from_env().shift_date("20200101", "pt0")
    assert "effusion" in p.findings_absent and shifted and p.study_day == date_to_day(shifted)
    assert p.study_date == shifted and p.patient_id == PhiPolicy.from_env().pseudonym("pt0", "patient")
    # the report's mentions are mined at build time, on the stored text (answers highlight from them)
    assert p.report and p.mentions == [Mention(e.span[0], e.span[1], e.anatomy, e.finding, e.status)
                                       for e in EntityExtractor().extract(p.report)]
    opacity = next(m for m in p.mentions if (m.anatomy, m.finding, m.status) == ("left lower lobe", "opacity", "present"))
    assert "opacity" in p.report[opacity.start:opacity.end].lower()


def _sid(s):
    from retrieval.index import SearchFilter

    return SearchFilter(study_ids=[s])


def test_anatomy_conditioned_search_ranks_by_that_anatomy(built):
    _, uri, _ = built
    s = Searcher.for_index(open_index(uri), load_text=False)
    query = synthetic_cxr(1000, left_blob=True)
    left = s.by_image([query], Query(k=6, anatomy="left lung"))
    assert left.space == "image@left lung" and left.conditioning == "embedding:left lung"
    assert [h.study_id for h in left.hits].count("st00") <= 1
    kinds = ["LRN"[int(h.study_id[2:]) % 3] for h in left.hits]
    assert kinds.count("L") >= 5, kinds
    lobe = s.by_image([query], Query(k=3, anatomy="left lower lobe"))  # nearest ancestor's space
    assert lobe.space == "image@left lung"


def test_finding_filter_and_exclusions(built):
    _, uri, _ = built
    s = Searcher.for_index(open_index(uri), load_text=False)
    res = s.by_image([synthetic_cxr(7)], Query(k=20, anatomy="left lung", finding="opacity"))
    assert res.hits and all(Label("left lower lobe", "opacity", "present") in h.matched_entities for h in res.hits)
    assert res.conditioning == "embedding:left lung+filter"
    none = s.by_image([synthetic_cxr(7)], Query(k=20, finding="pneumonia"))
    assert none.hits == []  # "possibly pneumonia" is uncertain, not present
    hedged = s.by_image([synthetic_cxr(7)], Query(k=20, finding="pneumonia", include_uncertain=True))
    assert {int(h.study_id[2:]) % 3 for h in hedged.hits} == {1}
    own = s.by_study("st06", Query(k=30), same_patient=False)
    ids = [h.study_id for h in own.hits]
    assert "st06" not in ids and "st07" not in ids  # own study and same patient (pt3) excluded
    assert "st07" in [h.study_id for h in s.by_study("st06", Query(k=30)).hits]


def test_text_queries(built):
    _, uri, _ = built
    s = Searcher.for_index(open_index(uri))
    rep = s.reports_by_text("opacity in the left lower lobe", Query(k=3))
    assert rep.mode == "text->report" and "left lower lobe" in rep.hits[0].report
    with pytest.raises(SearchError, match="joint image-text encoder"):
        s.by_text("left effusion", Query(k=3))
    with pytest.raises(UnknownTermError, match="Did you mean"):
        s.by_image([synthetic_cxr(1)], Query(anatomy="left lunq"))


def test_report_only_studies_are_indexed(tmp_path):
    write_manifest(tmp_path / "m.jsonl", [Study(study_id=f"r{i}", report=r) for i, r in enumerate(REPORTS.values())])
    rep = build_index(tmp_path / "m.jsonl", f"faiss:{tmp_path}/ix", BuildConfig(), progress=False)
    assert rep.points == 3 and rep.images == 0
    s = Searcher.for_index(open_index(f"faiss:{tmp_path}/ix"))
    assert s.reports_by_text("pneumonia in the right lung", Query(k=1)).hits[0].study_id == "r1"


def test_cli_build_and_search(dataset, tmp_path, capsys):
    root, _ = dataset
    uri = f"qdrant+local:{tmp_path}/cli"
    assert main(["index", "build", str(root / "manifest.jsonl"), "--index", uri, "--no-progress",
                 "--text-encoder", "none", "--conditioning", "left lung,heart"]) == 0
    out = capsys.readouterr().out
    assert "published" in out and "23 studies" in out and "st03_frontal.png: corrupt image" in out
    q = str(root / "images" / "st00_frontal.png")
    assert main(["search", "--index", uri, "--image", q, "--anatomy", "left lung", "-k", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["space"] == "image@left lung" and len(res["hits"]) == 3
    # the query's own image (same pixels) never comes back, whatever study it is stored under
    assert not any((h["image"] or "").endswith("st00_frontal.png") for h in res["hits"])
    assert all(h["score"] < 0.9999 for h in res["hits"])
    assert main(["search", "--index", uri, "--image", q, "--anatomy", "left lunq"]) == 2
    assert "unknown anatomy 'left lunq'" in capsys.readouterr().err
    assert main(["search", "--index", uri, "--image", str(tmp_path / "nope.png")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["search", "--index", f"faiss:{tmp_path}/missing", "--image", q]) == 2
    assert "no published index" in capsys.readouterr().err


@pytest.mark.slow
def test_native_encoder_build_is_consistent_between_backends(dataset, tmp_path):
    root, _ = dataset
    from retrieval.encoders import create_encoder

    create_encoder("medrag-native", allow_random=True, seed=0).save(tmp_path / "ck")
    cfg = BuildConfig(encoder="medrag-native", checkpoint=str(tmp_path / "ck"), text_encoder=None, index_kind="flat")
    hits = []
    for uri in (f"faiss:{tmp_path}/f", f"qdrant+local:{tmp_path}/q"):
        build_index(root / "manifest.jsonl", uri, cfg, progress=False)
        s = Searcher.for_index(open_index(uri))
        hits.append([(h.study_id, round(h.score, 4)) for h in s.by_image([synthetic_cxr(5)], Query(k=5, anatomy="heart")).hits])
    # an untrained network scores many cases alike: compare the scores, tolerant of tie order
    np.testing.assert_allclose([h[1] for h in hits[0]], [h[1] for h in hits[1]], atol=2e-4)
    assert hits[0][0][1] >= hits[0][-1][1]
