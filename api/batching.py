"""Micro-batching of concurrent searches and encoder forwards, so the API needs no global lock.

Requests run in worker threads. Instead of one lock around every model and index call, the
searcher's index and image encoder are wrapped here:

* :class:`BatchingIndex`: concurrent ``search`` calls with the same space, ``k`` and filter
  (the common case: many clients, no filter) wait up to ``wait_s`` (about 2 ms) or until
  ``max_batch`` have arrived, and go to the backend as one ``search`` with a query matrix; each
  caller gets its own rows back. FAISS reads are thread-safe, so FAISS indexes are called without
  a lock; other backends (embedded Qdrant is not documented thread-safe for concurrent calls
  from several threads) get one lock per index, held only for the batched engine call.
* :class:`BatchingEncoder`: concurrent ``encode_images`` calls for the same anatomy become one
  forward pass. Forwards run one at a time (a lock): on a few cores two concurrent forwards
  only fight over the same cores, and one batched forward is cheaper than several small ones.

A lone request does not wait: the leader of a batch only waits for company when other requests
are in flight. With ``adaptive`` (what ``medrag serve`` uses) it waits no longer than one engine
call has been taking (a running mean): merging saves at most the calls' own time, so a wait
longer than a call costs latency it cannot earn back. A 60-image flat FAISS index answers in
tens of microseconds and then hardly waits; a large HNSW or an encoder forward keeps the
configured wait. What callers may rely on: the same answers as unbatched calls (ties aside), and an
exception raised for a batch is re-raised per item by running the items one by one, so a bad
query fails alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import msgspec
import numpy as np

T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    __slots__ = ("done", "error", "full", "items", "results")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.results: list[R] | None = None
        self.error: BaseException | None = None
        self.full = threading.Event()  # max_batch reached: the leader stops waiting
        self.done = threading.Event()  # results (or error) are set


class ThreadBatcher(Generic[T, R]):
    """Merge concurrent blocking calls that share a key into one ``run(key, items)`` call.

    The first caller of a key becomes the batch's leader: it waits up to ``wait_s`` (only when
    other calls are in flight) or until ``max_batch`` items have joined, then runs the batch in
    its own thread; the others block until their result is ready.
    """

    def __init__(self, run: Callable[[Any, list[T]], list[R]], max_batch: int = 32, wait_s: float = 0.002,
                 adaptive: bool = False) -> None:
        if max_batch < 1 or wait_s < 0:
            raise ValueError("max_batch must be >= 1 and wait_s >= 0")
        self._run = run
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.adaptive = adaptive
        self.call_s = wait_s  # running mean of one engine call's duration (adaptive waits)
        self._lock = threading.Lock()
        self._open: dict[Hashable, _Batch[T, R]] = {}
        self._active = 0
        self.batches = 0  # engine calls made (for tests and metrics)
        self.items = 0  # items answered

    def call(self, key: Hashable, item: T) -> R:
        with self._lock:
            self._active += 1
            batch = self._open.get(key)
            leader = batch is None
            if batch is None:
                batch = self._open[key] = _Batch()
            slot = len(batch.items)
            batch.items.append(item)
            if len(batch.items) >= self.max_batch:
                del self._open[key]  # closed: later callers start a new batch
                batch.full.set()
            company = self._active > 1
        try:
            if leader:
                wait = min(self.wait_s, self.call_s) if self.adaptive else self.wait_s
                if company and wait > 0:
                    batch.full.wait(wait)
                with self._lock:
                    if self._open.get(key) is batch:
                        del self._open[key]
                self._execute(key, batch)
            else:
                batch.done.wait()
        finally:
            with self._lock:
                self._active -= 1
        if batch.error is not None:
            raise batch.error
        assert batch.results is not None
        return batch.results[slot]

    def _execute(self, key: Hashable, batch: _Batch[T, R]) -> None:
        try:
            try:
                t0 = time.perf_counter()
                results: list[Any] = self._run(key, batch.items)
                self.call_s = 0.8 * self.call_s + 0.2 * (time.perf_counter() - t0)
            except Exception:
                if len(batch.items) == 1:
                    raise
                # one bad item must not fail its neighbours: answer each alone, keep its own error
                results = []
                for it in batch.items:
                    try:
                        results.extend(self._run(key, [it]))
                    except Exception as exc:  # noqa: BLE001 (re-raised to that item's caller)
                        results.append(_Raise(exc))
            batch.results = results
            with self._lock:
                self.batches += 1
                self.items += len(batch.items)
        except BaseException as exc:  # noqa: BLE001 (handed to every waiter)
            batch.error = exc
        finally:
            batch.done.set()


class _Raise:
    """A per-item failure stored in a batch's results; :func:`_unwrap` raises it for its caller."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _unwrap(value: Any) -> Any:
    if isinstance(value, _Raise):
        raise value.exc
    return value


class BatchingIndex:
    """A :class:`~retrieval.index.VectorIndex` proxy that batches concurrent one-row searches."""

    def __init__(self, index: Any, max_batch: int = 32, wait_s: float = 0.002, adaptive: bool = False) -> None:
        self._inner = index
        # FAISS search is thread-safe for reads; other engines get one lock around each call
        self._engine_lock = None if index.meta.backend == "faiss" else threading.Lock()
        self.batcher: ThreadBatcher[tuple[np.ndarray, Any], list[Any]] = ThreadBatcher(
            self._search_rows, max_batch, wait_s, adaptive)

    def __getattr__(self, name: str) -> Any:  # meta, uri, find, vectors, payloads, close, ...
        return getattr(self._inner, name)

    def __len__(self) -> int:
        return len(self._inner)

    def search(self, space: str, queries: np.ndarray, k: int, flt: Any = None) -> list[list[Any]]:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[0] != 1:
            return self._call(lambda: self._inner.search(space, q, k, flt))
        flt_key = b"" if flt is None or flt.is_empty() else msgspec.json.encode(flt)
        # requests with equal filters (same JSON) share a batch; each item carries its filter
        return [_unwrap(self.batcher.call((space, k, flt_key), (q, flt)))]

    def _search_rows(self, key: Any, items: list[tuple[np.ndarray, Any]]) -> list[list[Any]]:
        space, k, _ = key
        flt = items[0][1]
        return self._call(lambda: self._inner.search(space, np.concatenate([q for q, _ in items]), k, flt))

    def _call(self, fn: Callable[[], R]) -> R:
        if self._engine_lock is None:
            return fn()
        with self._engine_lock:
            return fn()


class BatchingEncoder:
    """An image-encoder proxy: concurrent ``encode_images`` calls for one anatomy -> one forward."""

    def __init__(self, encoder: Any, max_batch: int = 16, wait_s: float = 0.002, adaptive: bool = False) -> None:
        self._inner = encoder
        self._forward = threading.Lock()
        self.batcher: ThreadBatcher[list[np.ndarray], np.ndarray] = ThreadBatcher(
            self._encode, max_batch, wait_s, adaptive)

    def __getattr__(self, name: str) -> Any:  # dim, family, encode_texts, attention_maps, ...
        return getattr(self._inner, name)

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        return np.asarray(_unwrap(self.batcher.call(anatomy, list(images))))

    def _encode(self, anatomy: Any, groups: list[list[np.ndarray]]) -> list[np.ndarray]:
        flat = [img for g in groups for img in g]
        with self._forward:
            out = np.asarray(self._inner.encode_images(flat, anatomy=anatomy))
        res, at = [], 0
        for g in groups:
            res.append(out[at:at + len(g)])
            at += len(g)
        return res


class Serialised:
    """A proxy running an object's ``encode_texts`` one call at a time: Hugging Face fast
    tokenizers raise "Already borrowed" when one instance is used from two threads at once."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return np.asarray(self._inner.encode_texts(texts))


def set_thread_budgets(torch_threads: int | None, faiss_threads: int | None) -> None:
    """Set torch's intra-op and FAISS's OpenMP thread counts deliberately.

    With requests served concurrently, library defaults (one thread per core each) oversubscribe
    the cores and a search waits behind an encoder forward; ``None`` keeps the library default.
    """
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    if faiss_threads:
        import faiss

        faiss.omp_set_num_threads(faiss_threads)


def install(searcher: Any, max_batch: int = 32, wait_s: float = 0.002, adaptive: bool = False) -> None:
    """Wrap a :class:`retrieval.search.Searcher`'s index and image encoder (idempotent)."""
    if not isinstance(searcher.index, BatchingIndex):
        searcher.index = BatchingIndex(searcher.index, max_batch, wait_s, adaptive)
    enc = searcher.image_encoder
    if enc is not None and not isinstance(enc, BatchingEncoder) and hasattr(enc, "encode_images"):
        searcher.image_encoder = BatchingEncoder(enc, max(1, max_batch // 2), wait_s, adaptive)
    if searcher.text_encoder is not None and not isinstance(searcher.text_encoder, Serialised):
        searcher.text_encoder = Serialised(searcher.text_encoder)
