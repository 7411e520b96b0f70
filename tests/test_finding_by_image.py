"""Asking a finding of the image (``finding_by="image"``): the query vector states the finding in
its anatomy's space and no report filter applies, so cases without a report are found too.

Real data and model: the 60 NIH radiographs and the learned encoder shipped for the demo
(``demo/nih60``, ``demo/model``: EfficientNet-Lite0 from PyPI + head + label probe), indexed
with FAISS. A tiny random model checks the vector arithmetic exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from indexer.build import BuildConfig, build_index
from indexer.manifest import write_manifest
from indexer.sources.labelled import from_labels_csv
from retrieval.encoders import EncoderError
from retrieval.encoders.base import FindingQueries
from retrieval.index import IMAGE, SearchFilter, open_index
from retrieval.records import Payload
from retrieval.search import Query, Searcher, SearchError

from .conftest import ROOT

DEMO = ROOT / "demo"


def _tiny(probe_weight: float = 10.0):
    import torch

    from retrieval.encoders.native import NORMAL, NativeConfig, NativeEncoder, build_model

    cfg = NativeConfig(image_size=32, widths=(8, 16), token_dim=16, embed_dim=8,
                       anatomies=("<global>", "heart", "pleura"),
                       probe_labels=("heart|cardiomegaly", "pleura|effusion", NORMAL), probe_weight=probe_weight)
    torch.manual_seed(0)
    return NativeEncoder(cfg, build_model(cfg))


def test_asking_a_finding_sets_its_probability_to_one_and_normal_to_zero():
    enc = _tiny()
    assert isinstance(enc, FindingQueries)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(4, 8)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    p = rng.uniform(0.05, 0.95, size=(4, 3)).astype(np.float32) * np.array([1, 0, 1], np.float32)  # heart mask
    stored = np.concatenate([z, 10 * p], 1)
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    before = stored.copy()
    asked = enc.assert_finding(stored, "heart", "cardiomegaly")
    np.testing.assert_array_equal(stored, before)  # the stored vectors are not touched
    expect = np.concatenate([z, 10 * np.stack([np.ones(4), p[:, 1], np.zeros(4)], 1)], 1)
    expect /= np.linalg.norm(expect, axis=1, keepdims=True)
    np.testing.assert_allclose(asked, expect, atol=1e-6)
    assert enc.finding_space("cardiomegaly") == "heart" and enc.finding_space("effusion") == "pleura"


def test_with_the_same_look_the_ranking_follows_the_image_reading_of_the_finding():
    """Gallery cases that differ only in their probability of cardiomegaly rank by it once the
    finding is asked; the plain query (itself read at p = 0.1) prefers cases read like itself."""
    enc = _tiny()
    z = np.ones((1, 8), np.float32) / np.sqrt(8)
    probs = np.array([0.2, 0.9, 0.5, 0.05, 0.7], np.float32)
    # [head, 10 p(cardiomegaly), effusion (masked out of the heart space), normal]
    gallery = np.concatenate([np.repeat(z, 5, 0), 10 * probs[:, None], np.zeros((5, 2), np.float32)], 1)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    query = np.concatenate([z, [[1.0, 0.0, 0.0]]], 1).astype(np.float32)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    plain = np.argsort(-(query @ gallery.T)[0])
    asked = np.argsort(-(enc.assert_finding(query, "heart", "cardiomegaly") @ gallery.T)[0])
    assert list(asked) == list(np.argsort(-probs))  # 0.9, 0.7, 0.5, 0.2, 0.05
    assert set(plain[:2]) == {0, 3}  # 0.2 and 0.05: the cases read most like the query itself


def test_clear_errors_when_the_finding_cannot_be_asked():
    enc = _tiny()
    v = np.ones((1, enc.dim), np.float32)
    with pytest.raises(EncoderError, match="does not read 'cardiomegaly'.*'heart'"):
        enc.assert_finding(v, "pleura", "cardiomegaly")
    with pytest.raises(EncoderError, match="no 'pneumothorax' label"):
        enc.assert_finding(v, None, "pneumothorax")
    with pytest.raises(EncoderError, match="no label probe"):
        _tiny(probe_weight=0.0).assert_finding(v, None, "cardiomegaly")


@pytest.fixture(scope="module")
def demo_index(tmp_path_factory):
    root = tmp_path_factory.mktemp("asked")
    res = from_labels_csv(DEMO / "nih60", root / "m.jsonl")
    write_manifest(root / "m.jsonl", res.studies)
    uri = f"faiss:{root}/ix"
    build_index(root / "m.jsonl", uri, BuildConfig(encoder="medrag-native", checkpoint=str(DEMO / "model"),
                                                    text_encoder=None, conditioning=("heart", "pleura", "lung"),
                                                    index_kind="flat"), progress=False)
    return open_index(uri), res.studies


def test_search_asks_the_image_in_the_findings_space_and_filters_nothing(demo_index):
    index, studies = demo_index
    searcher = Searcher.for_index(index, load_text=False)
    labelled = {s.study_id: set(s.labels or []) for s in studies}
    query = next(s for s in studies if "Cardiomegaly" in (s.labels or []))
    k = 59
    asked = searcher.by_study(query.study_id, Query(k=k, finding="cardiomegaly", finding_by="image"))
    assert asked.space == "image@heart" and asked.conditioning == "embedding:heart+image-finding:cardiomegaly"
    assert not asked.filter.get("findings") and not asked.filter.get("anatomy_findings")
    ids = [h.study_id for h in asked.hits]
    assert len(ids) == k and query.study_id not in ids
    assert any("Cardiomegaly" not in labelled[i] for i in ids)  # no report filter: every case can come back
    # the index's ranking is exactly the asked query vector against the stored heart vectors
    study_of = {p.id: Payload.of(p.payload).study_id for p in index.find(SearchFilter(), limit=1000)}
    own = [i for i, s in study_of.items() if s == query.study_id]
    others = [i for i, s in study_of.items() if s != query.study_id]
    mean = index.vectors("image@heart", own).mean(0, keepdims=True)
    q = searcher.image_encoder.assert_finding(mean / np.linalg.norm(mean), "heart", "cardiomegaly")
    scores = (index.vectors("image@heart", others) @ q.T).ravel()
    brute = [study_of[others[i]] for i in np.argsort(-scores, kind="stable")]
    assert ids[:10] == brute[:10]
    filtered = searcher.by_study(query.study_id, Query(k=5, finding="cardiomegaly"))
    assert filtered.conditioning == "filter"
    assert all("Cardiomegaly" in labelled[h.study_id] for h in filtered.hits)


def test_asking_needs_an_image_query_and_an_encoder_that_reads_findings(demo_index, tmp_path):
    index, studies = demo_index
    searcher = Searcher.for_index(index, load_text=False)
    sid = studies[0].study_id
    with pytest.raises(SearchError, match="needs a finding"):
        searcher.by_study(sid, Query(finding_by="image"))
    with pytest.raises(SearchError, match="'report' or 'image'"):
        searcher.by_study(sid, Query(finding="effusion", finding_by="pixels"))
    with pytest.raises(SearchError, match="applies to image and study queries"):
        searcher.by_vector(np.ones(index.meta.spaces[IMAGE]), IMAGE, Query(finding="effusion", finding_by="image"))
    with pytest.raises(SearchError, match="does not read 'effusion'"):
        searcher.by_study(sid, Query(anatomy="heart", finding="effusion", finding_by="image"))
    res = from_labels_csv(DEMO / "nih60", tmp_path / "m.jsonl")
    write_manifest(tmp_path / "m.jsonl", res.studies[:6])
    build_index(tmp_path / "m.jsonl", f"faiss:{tmp_path}/px", BuildConfig(text_encoder=None), progress=False)
    px = Searcher.for_index(open_index(f"faiss:{tmp_path}/px"), load_text=False)
    with pytest.raises(SearchError, match="reads findings from the image"):
        px.by_study(res.studies[0].study_id, Query(finding="effusion", finding_by="image"))
