"""Congruence: every backend answers the same queries like an exact numpy scan (ties tolerated).

FAISS (flat, HNSW, IVF), embedded Qdrant (qdrant-edge) and the Qdrant server API (qdrant-client
``:memory:``) get identical points, payloads and filters.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from retrieval.index import IndexError_, IndexMeta, SearchFilter, open_index, open_writer
from retrieval.index.base import SearchRequest
from retrieval.records import Payload

N, D, K = 600, 24, 10
_counter = itertools.count()
_SLOW = pytest.mark.slow  # the quick loop (make test-fast) keeps one exact index per engine
BACKENDS = [("faiss", "flat"), pytest.param("faiss", "hnsw", marks=_SLOW), ("faiss", "ivf"), ("qdrant-edge", "flat"),
            pytest.param("qdrant-edge", "hnsw", marks=_SLOW), ("qdrant-server", "flat")]


def _uri(backend: str, tmp_path) -> str:
    return {"faiss": f"faiss:{tmp_path}/faiss", "qdrant-edge": f"qdrant+local:{tmp_path}/edge",
            "qdrant-server": f"qdrant+memory://congruence{next(_counter)}"}[backend]


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    r = rng.standard_normal((N, 8)).astype(np.float32)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    payloads = [{
        "study_id": f"s{i // 2}", "patient_id": f"p{i % 13}", "modality": ["CR", "DX", "CT"][i % 3],
        "findings": ["effusion"] if i % 4 == 0 else [], "findings_any": ["effusion"] if i % 4 in (0, 1) else [],
        "anatomy_findings": ["pleura:effusion", "left pleura:effusion"] if i % 8 == 0 else [],
        "anatomy_findings_any": [], "study_day": 18000 + i, "study_date": None,
        "has_report": i % 5 != 0, "report": "r" if i % 5 else None} for i in range(N)]
    return x, r, payloads


def _build(uri, kind, x, r, payloads):
    spaces = {"image": D, "image@heart": D, "report": 8}
    w = open_writer(uri, spaces, IndexMeta(backend="", spaces=spaces, count=0), kind)
    present = {"report": np.array([p["has_report"] for p in payloads])}
    for s in range(0, N, 128):  # several batches, as a build does
        sl = slice(s, min(N, s + 128))
        w.add(np.arange(sl.start, sl.stop), {"image": x[sl], "image@heart": x[sl, ::-1].copy(),
                                              "report": r[sl]}, payloads[sl], {"report": present["report"][sl]})
    return w.commit()


def _exact(x, payloads, q, flt, k, present=None):
    ok = [i for i in range(N) if (flt is None or flt.matches(Payload.of(payloads[i]))) and (present is None or present[i])]
    sims = x[ok] @ q
    order = np.argsort(-sims, kind="stable")[:k]
    return [ok[j] for j in order], sims[order]


FILTERS = [None,
           SearchFilter(modality=["CR"]),
           SearchFilter(findings=["effusion"], exclude_patient_id="p3"),
           SearchFilter(findings=["effusion"], include_uncertain=True, date_from="2019-04-01"),
           SearchFilter(anatomy_findings=["left pleura:effusion"]),
           SearchFilter(exclude_study_ids=["s1", "s2"], has_report=True, date_to="2019-06-01")]


@pytest.mark.parametrize(("backend", "kind"), BACKENDS)
def test_backends_agree_with_exact_scan(backend, kind, tmp_path):
    x, r, payloads = _data()
    uri = _uri(backend, tmp_path)
    _build(uri, kind, x, r, payloads)
    ix = open_index(uri)
    assert len(ix) == N and ix.meta.spaces["image"] == D
    rng = np.random.default_rng(1)
    queries = x[rng.choice(N, 8, replace=False)] + 0.05 * rng.standard_normal((8, D)).astype(np.float32)
    exact_recall = kind == "flat"
    recalls = []
    for flt in FILTERS:
        for q in queries:
            got = ix.search("image", q[None], K, flt)[0]
            ref_ids, ref_sims = _exact(x, payloads, q, flt, K)
            assert all(flt is None or flt.matches(h.payload) for h in got)
            got_ids = [h.id for h in got]
            if exact_recall:
                assert len(got_ids) == len(ref_ids)
                # same ranking up to ties: scores agree position by position
                np.testing.assert_allclose([h.score for h in got], ref_sims, atol=1e-4)
                assert set(got_ids) == set(ref_ids) or np.isclose(ref_sims[-1], ref_sims[-2], atol=1e-5)
            recalls.append(len(set(got_ids) & set(ref_ids)) / max(1, len(ref_ids)))
    assert np.mean(recalls) >= (1.0 if exact_recall else 0.9), np.mean(recalls)
    # a sparse space: points without a report have no report vector
    has = np.array([p["has_report"] for p in payloads])
    got = ix.search("report", r[:1], K)[0]
    ref, _ = _exact(r, payloads, r[0], None, K, has)
    assert [h.id for h in got] == ref if kind == "flat" else len(set(h.id for h in got) & set(ref)) >= 8
    # stored vectors and payloads come back
    np.testing.assert_allclose(ix.vectors("image", [5, 7]), x[[5, 7]], atol=1e-6)
    assert ix.payloads([9])[0].study_id == "s4"
    assert {h.id for h in ix.find(SearchFilter(study_ids=["s10"]))} == {20, 21}
    with pytest.raises(IndexError_, match="no space"):
        ix.search("image@nowhere", x[:1], 3)
    with pytest.raises(IndexError_, match="dimension"):
        ix.search("image", np.zeros((1, D + 1), np.float32), 3)
    ix.close()


@pytest.mark.parametrize("backend", ["faiss", pytest.param("qdrant-edge", marks=_SLOW), "qdrant-server"])
def test_publish_is_atomic_and_abort_keeps_the_old_version(backend, tmp_path):
    x, r, payloads = _data()
    uri = _uri(backend, tmp_path)
    if backend != "qdrant-server":
        with pytest.raises(IndexError_, match="no published index"):
            open_index(uri)
    v1 = _build(uri, "flat", x, r, payloads)
    spaces = {"image": D, "image@heart": D, "report": 8}
    w = open_writer(uri, spaces, IndexMeta(backend="", spaces=spaces, count=0), "flat")
    w.add(np.arange(3), {"image": -x[:3], "image@heart": x[:3], "report": r[:3]}, payloads[:3])
    ix = open_index(uri)  # a reader during the build still sees v1, complete
    assert len(ix) == N and ix.meta.version == v1
    w.abort()
    assert len(open_index(uri)) == N
    v2 = _build(uri, "flat", x[::-1].copy(), r, payloads)
    assert v2 != v1 and open_index(uri).meta.version == v2


def _same_hits(got, ref):
    """Same ranking up to ties: scores agree position by position, ids agree unless tied."""
    assert len(got) == len(ref)
    np.testing.assert_allclose([h.score for h in got], [h.score for h in ref], atol=1e-5)
    for g, r in zip(got, ref, strict=True):
        assert g.id == r.id or np.isclose(g.score, r.score, atol=1e-5)
        assert g.payload == r.payload


@pytest.mark.parametrize(("backend", "kind"), BACKENDS)
def test_search_batch_equals_one_by_one(backend, kind, tmp_path):
    x, r, payloads = _data()
    uri = _uri(backend, tmp_path)
    _build(uri, kind, x, r, payloads)
    ix = open_index(uri)
    rng = np.random.default_rng(2)
    rows = rng.choice(N, 12, replace=False)
    qs = x[rows] + 0.05 * rng.standard_normal((12, D)).astype(np.float32)
    # a mixed batch: spaces, k, shared and per-query filters (each query excluding its own study)
    reqs = [SearchRequest("image", q, K, FILTERS[i % len(FILTERS)]) for i, q in enumerate(qs[:6])]
    reqs += [SearchRequest("image", q, 3 + i, SearchFilter(exclude_study_ids=[payloads[row]["study_id"]]))
             for i, (q, row) in enumerate(zip(qs[6:9], rows[6:9], strict=True))]
    reqs += [SearchRequest("image@heart", qs[9][::-1].copy(), K), SearchRequest("report", r[rows[10]], 5),
             SearchRequest("image", qs[11][None], K)]  # a (1, dim) row is accepted too
    batch = ix.search_batch(reqs)
    assert len(batch) == len(reqs)
    for req, got in zip(reqs, batch, strict=True):
        _same_hits(got, ix.search(req.space, req.row(), req.k, req.flt)[0])
        assert all(req.flt is None or req.flt.matches(h.payload) for h in got)
    # several rows under one filter through ``search`` equal the rows one by one
    flt = FILTERS[2]
    for q, got in zip(qs, ix.search("image", qs, K, flt), strict=True):
        _same_hits(got, ix.search("image", q[None], K, flt)[0])
    assert ix.search_batch([]) == []
    with pytest.raises(IndexError_, match="one vector"):
        ix.search_batch([SearchRequest("image", qs[:2], K)])
    with pytest.raises(IndexError_, match="dimension"):
        ix.search_batch([SearchRequest("image", np.zeros(D + 1, np.float32), K)])
    ix.close()
