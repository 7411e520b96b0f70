"""Concurrent searches (no global lock, micro-batched) give exactly the serial answers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from retrieval.batching import Batching, BatchingEncoder, BatchingIndex, ThreadBatcher
from retrieval.encoders.base import FindingQueries, ImageEncoder, is_joint
from retrieval.index import SearchFilter, VectorIndex, open_index
from retrieval.search import Query, Searcher

from .conftest import synthetic_cxr


@pytest.fixture(scope="module")
def searchers(small_index):
    index = open_index(small_index[1])
    serial = Searcher.for_index(index, load_text=False)
    # a long wait: threads started together share batches
    batched = Searcher(index, serial.image_encoder, None, batching=Batching(max_batch=64, wait_s=0.05))
    yield serial, batched
    index.close()


def _ids(res):
    return [(h.study_id, round(h.score, 5)) for h in res.hits]


def _together(fn, items, threads=8):
    barrier = threading.Barrier(threads)

    def run(item):
        barrier.wait() if item[0] < threads else None
        return fn(item[1])

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, list(enumerate(items))))


def test_concurrent_vector_searches_equal_serial_ones(searchers):
    serial, batched = searchers
    ids = [p.id for p in serial.index.find(SearchFilter(), limit=100)][:16]
    vecs = serial.index.vectors("image", ids)
    queries = [(v, Query(k=5, finding="effusion" if i % 3 == 0 else None)) for i, v in enumerate(vecs)] * 2
    want = [_ids(serial.by_vector(v, "image", q)) for v, q in queries]
    got = _together(lambda vq: _ids(batched.by_vector(vq[0], "image", vq[1])), queries)
    assert got == want
    b = batched.index.batcher
    assert b.items == len(queries) and b.batches < len(queries)  # some searches really shared a call


def test_concurrent_image_searches_equal_serial_ones(searchers):
    serial, batched = searchers
    images = [synthetic_cxr(100 + i, left_blob=i % 2 == 0) for i in range(8)]
    for anatomy in (None, "left lung"):
        want = [_ids(serial.by_image([im], Query(k=4, anatomy=anatomy))) for im in images]
        got = _together(lambda im, a=anatomy: _ids(batched.by_image([im], Query(k=4, anatomy=a))), images)
        assert got == want
    enc = batched.image_encoder
    assert isinstance(enc, BatchingEncoder) and enc.batcher.batches < enc.batcher.items


def test_a_bad_item_fails_alone():
    def run(_key, items):
        if "bad" in items:
            raise ValueError("bad item")
        return [x.upper() for x in items]

    b: ThreadBatcher[str, str] = ThreadBatcher(run, max_batch=8, wait_s=0.05)
    items = ["a", "bad", "c", "d"]
    out: dict[str, object] = {}

    def call(x):
        try:
            out[x] = b.call("k", x)
        except ValueError as exc:
            out[x] = exc

    _together(call, items, threads=4)
    assert out["a"] == "A" and out["c"] == "C" and out["d"] == "D"
    assert isinstance(out["bad"], ValueError) and str(out["bad"]) == "bad item"


def test_a_lone_call_does_not_wait():
    import time

    b: ThreadBatcher[int, int] = ThreadBatcher(lambda _k, xs: [x * 2 for x in xs], max_batch=8, wait_s=1.0)
    t0 = time.perf_counter()
    assert b.call("k", 21) == 42
    assert time.perf_counter() - t0 < 0.5


def test_adaptive_wait_is_no_longer_than_an_engine_call():
    """With company in flight, a leader waits min(wait_s, the calls' running mean): a cheap engine
    stops waiting, an expensive one still batches."""
    import threading
    import time

    def timed(cost: float) -> tuple[ThreadBatcher[int, int], list[float]]:
        def run(_k, xs):
            time.sleep(cost)
            return [x * 2 for x in xs]

        b: ThreadBatcher[int, int] = ThreadBatcher(run, max_batch=64, wait_s=0.2, adaptive=True)
        lat: list[float] = []
        for _ in range(15):  # rounds of 4 concurrent calls; the running mean settles on the call's cost
            start = threading.Barrier(4)

            def one(i: int, start: threading.Barrier = start) -> None:
                start.wait()
                t0 = time.perf_counter()
                assert b.call("k", i) == 2 * i
                lat.append(time.perf_counter() - t0)

            ts = [threading.Thread(target=one, args=(i,)) for i in range(4)]
            [t.start() for t in ts]
            [t.join() for t in ts]
        return b, lat

    cheap, lat = timed(0.0)
    assert cheap.call_s < 0.02 and max(lat[-4:]) < 0.1  # no 200 ms waits once the cost is known
    dear, _ = timed(0.05)
    assert dear.call_s > 0.03 and dear.batches < dear.items  # slow calls keep merging


def test_batching_index_passes_multi_row_queries_through(small_index):
    index = open_index(small_index[1])
    try:
        wrapped = BatchingIndex(index)
        q = index.vectors("image", [p.id for p in index.find(SearchFilter(), limit=3)])
        want = [[h.id for h in row] for row in index.search("image", np.asarray(q), 3)]
        assert [[h.id for h in row] for row in wrapped.search("image", np.asarray(q), 3)] == want
        assert wrapped.batcher.items == 0 and len(wrapped) == len(index)
    finally:
        index.close()


def test_the_wrappers_satisfy_the_protocols_they_wrap(searchers):
    """Composition, not patching: the Searcher is built with wrappers that are what they wrap
    (an index, an image encoder with the same abilities), and forward nothing implicitly."""
    serial, batched = searchers
    inner = serial.image_encoder
    enc = batched.image_encoder
    assert isinstance(batched.index, BatchingIndex) and isinstance(batched.index, VectorIndex)
    assert batched.index.inner is serial.index and serial.index.concurrent_reads  # FAISS: no engine lock
    assert isinstance(enc, BatchingEncoder) and isinstance(enc, ImageEncoder) and enc.inner is inner
    assert is_joint(enc) == is_joint(inner)
    assert isinstance(enc, FindingQueries) == isinstance(inner, FindingQueries)
    assert hasattr(enc, "attention_maps") == hasattr(inner, "attention_maps")
    assert not any("__getattr__" in vars(c) for c in type(enc).__mro__ + type(batched.index).__mro__)
    assert (enc.name, enc.dim, enc.describe()) == (inner.name, inner.dim, inner.describe())
    # a hot reload builds a new Searcher with the previous one's encoders: not wrapped twice
    again = Searcher(serial.index, enc, None, batching=Batching())
    assert again.image_encoder is enc and isinstance(again.index, BatchingIndex)
    with pytest.raises(AttributeError):
        enc.not_an_encoder_method  # noqa: B018
