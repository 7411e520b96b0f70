"""Micro-batching of concurrent searches and encoder forwards, as wrappers a Searcher is built with.

A server answers requests in worker threads. Instead of one lock around every model and index
call, the index and the encoders are wrapped when the :class:`~retrieval.search.Searcher` is
built (``Searcher(..., batching=Batching(...))``); each wrapper satisfies the protocol of what it
wraps, so the searcher calls them as it calls the bare objects:

* :class:`BatchingIndex` (a :class:`~retrieval.index.VectorIndex`): concurrent ``search`` calls
  with the same space, ``k`` and filter (the common case: many clients, no filter) wait up to
  ``wait_s`` (about 2 ms) or until ``max_batch`` have arrived, and go to the backend as one
  ``search`` with a query matrix; each caller gets its own rows back. An index whose reads are
  thread-safe (``concurrent_reads``: FAISS) is called without a lock; others (embedded Qdrant is
  not documented thread-safe for calls from several threads) get one lock, held only for the
  batched engine call.
* :class:`BatchingEncoder` (an :class:`~retrieval.encoders.base.ImageEncoder`): concurrent
  ``encode_images`` calls for the same anatomy become one forward pass. Forwards run one at a
  time (a lock): on a few cores two concurrent forwards only fight over the same cores, and one
  batched forward is cheaper than several small ones. The wrapper keeps the wrapped encoder's
  other abilities (joint text embedding, findings asked of the image, attention maps), each
  forwarded by a method of its own, so ``is_joint`` and the capability protocols see through it.
* :class:`SerialisedText` (a :class:`~retrieval.encoders.base.TextEncoder`): ``encode_texts``
  one call at a time (Hugging Face fast tokenizers raise "Already borrowed" when one instance is
  used from two threads at once).

A lone request does not wait: the leader of a batch only waits for company when other requests
are in flight. With ``adaptive`` (what ``medrag serve`` uses) it waits no longer than one engine
call has been taking (a running mean): merging saves at most the calls' own time, so a wait
longer than a call costs latency it cannot earn back. What callers may rely on: the same answers
as unbatched calls (ties aside), and an exception raised for a batch is re-raised per item by
running the items one by one, so a bad query fails alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

import msgspec
import numpy as np

from retrieval.encoders.base import FindingQueries, ImageEncoder, TextEncoder
from retrieval.index.base import Hit, IndexMeta, SearchFilter, SearchRequest, VectorIndex
from retrieval.records import Payload

T = TypeVar("T")
R = TypeVar("R")


class _Batch(Generic[T, R]):
    __slots__ = ("done", "error", "full", "items", "results")

    def __init__(self) -> None:
        self.items: list[T] = []
        self.results: list[R | _Raise] | None = None
        self.error: BaseException | None = None
        self.full = threading.Event()  # max_batch reached: the leader stops waiting
        self.done = threading.Event()  # results (or error) are set


class _Raise:
    """A per-item failure stored in a batch's results, raised again for that item's caller."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


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
        result = batch.results[slot]
        if isinstance(result, _Raise):
            raise result.exc
        return result

    def _execute(self, key: Hashable, batch: _Batch[T, R]) -> None:
        try:
            results: list[R | _Raise]
            try:
                t0 = time.perf_counter()
                results = list(self._run(key, batch.items))
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


_Key = tuple[str, int, bytes]  # space, k, the filter's JSON (b"": none)


class BatchingIndex:
    """A :class:`~retrieval.index.VectorIndex` that batches concurrent one-row searches."""

    concurrent_reads = True  # it locks around the engine where the engine needs it

    def __init__(self, index: VectorIndex, max_batch: int = 32, wait_s: float = 0.002, adaptive: bool = False) -> None:
        self.inner = index
        self.uri: str = index.uri
        self.meta: IndexMeta = index.meta  # an opened version's metadata does not change
        # thread-safe reads (FAISS) run unlocked; other engines get one lock around each call
        self._engine_lock = None if index.concurrent_reads else threading.Lock()
        self.batcher: ThreadBatcher[tuple[np.ndarray, SearchFilter | None], list[Hit]] = ThreadBatcher(
            self._search_rows, max_batch, wait_s, adaptive)

    def __len__(self) -> int:
        return len(self.inner)

    def search(self, space: str, queries: np.ndarray, k: int, flt: SearchFilter | None = None) -> list[list[Hit]]:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[0] != 1:
            return self._call(lambda: self.inner.search(space, q, k, flt))
        flt_key = b"" if flt is None or flt.is_empty() else msgspec.json.encode(flt)
        # requests with equal filters (same JSON) share a batch; each item carries its filter
        return [self.batcher.call((space, k, flt_key), (q, flt))]

    def _search_rows(self, key: _Key, items: list[tuple[np.ndarray, SearchFilter | None]]) -> list[list[Hit]]:
        space, k, _ = key
        flt = items[0][1]
        return self._call(lambda: self.inner.search(space, np.concatenate([q for q, _ in items]), k, flt))

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        return self._call(lambda: self.inner.search_batch(requests))

    def payloads(self, ids: Sequence[int]) -> list[Payload]:
        return self._call(lambda: self.inner.payloads(ids))

    def find(self, flt: SearchFilter, limit: int = 100) -> list[Hit]:
        return self._call(lambda: self.inner.find(flt, limit))

    def vectors(self, space: str, ids: Sequence[int]) -> np.ndarray:
        return self._call(lambda: self.inner.vectors(space, ids))

    def close(self) -> None:
        self.inner.close()

    def _call(self, fn: Callable[[], R]) -> R:
        if self._engine_lock is None:
            return fn()
        with self._engine_lock:
            return fn()


class BatchingEncoder:
    """An :class:`~retrieval.encoders.base.ImageEncoder`: concurrent ``encode_images`` calls for
    one anatomy become one forward. Build it with :func:`batching_encoder`, which adds the wrapped
    encoder's other abilities."""

    def __init__(self, encoder: ImageEncoder, max_batch: int = 16, wait_s: float = 0.002,
                 adaptive: bool = False) -> None:
        self.inner = encoder
        self.name = encoder.name
        self.dim = encoder.dim
        self._forward = threading.Lock()
        self._texts_lock = threading.Lock()  # a joint encoder's text tower (see _JointTexts)
        self.batcher: ThreadBatcher[list[np.ndarray], np.ndarray] = ThreadBatcher(
            self._encode, max_batch, wait_s, adaptive)

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        return np.asarray(self.batcher.call(anatomy, list(images)))

    def supports_anatomy(self, anatomy: str) -> bool:
        return self.inner.supports_anatomy(anatomy)

    def describe(self) -> dict[str, object]:
        return self.inner.describe()

    def _encode(self, anatomy: str | None, groups: list[list[np.ndarray]]) -> list[np.ndarray]:
        flat = [img for g in groups for img in g]
        with self._forward:
            out = np.asarray(self.inner.encode_images(flat, anatomy=anatomy))
        res, at = [], 0
        for g in groups:
            res.append(out[at:at + len(g)])
            at += len(g)
        return res


class _JointTexts:
    """Text embedding into the image space (a joint encoder), one call at a time."""

    inner: Any
    _texts_lock: threading.Lock

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._texts_lock:
            return np.asarray(self.inner.encode_texts(texts))


class _AskedFindings:
    """Findings asked of the image (:class:`~retrieval.encoders.base.FindingQueries`)."""

    inner: Any

    def finding_space(self, finding: str) -> str | None:
        return cast(str | None, self.inner.finding_space(finding))

    def assert_finding(self, vectors: np.ndarray, anatomy: str | None, finding: str) -> np.ndarray:
        return np.asarray(self.inner.assert_finding(vectors, anatomy, finding))


class _AttentionMaps:
    """Where a conditioned query looks (medrag-native): the API's heat-map overlays."""

    inner: Any

    def attention_maps(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        return np.asarray(self.inner.attention_maps(images, anatomy=anatomy))


_CLASSES: dict[tuple[bool, bool, bool], type[BatchingEncoder]] = {}


def batching_encoder(encoder: ImageEncoder, max_batch: int = 16, wait_s: float = 0.002,
                     adaptive: bool = False) -> BatchingEncoder:
    """A :class:`BatchingEncoder` around ``encoder`` with the same optional abilities (a class per
    combination, each ability a method of its own: no attribute forwarding)."""
    abilities = (isinstance(encoder, TextEncoder), isinstance(encoder, FindingQueries),
                 callable(getattr(encoder, "attention_maps", None)))
    cls = _CLASSES.get(abilities)
    if cls is None:
        mixins = [m for m, has in zip((_JointTexts, _AskedFindings, _AttentionMaps), abilities, strict=True) if has]
        cls = _CLASSES[abilities] = cast(type[BatchingEncoder], type(
            "BatchingEncoder", (*mixins, BatchingEncoder), {})) if mixins else BatchingEncoder
    return cls(encoder, max_batch, wait_s, adaptive)


class SerialisedText:
    """A :class:`~retrieval.encoders.base.TextEncoder` running ``encode_texts`` one call at a time."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.dim = inner.dim
        self._lock = threading.Lock()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        with self._lock:
            return np.asarray(self.inner.encode_texts(texts))

    def describe(self) -> dict[str, object]:
        return self.inner.describe()


@dataclass(frozen=True)
class Batching:
    """How a Searcher's index and encoders are wrapped for concurrent callers (``medrag serve``:
    ``adaptive``). Wrapping what is already wrapped returns it as it is (a hot reload reuses the
    previous version's encoders)."""

    max_batch: int = 32
    wait_s: float = 0.002
    adaptive: bool = False

    def index(self, index: VectorIndex) -> VectorIndex:
        if isinstance(index, BatchingIndex):
            return index
        return BatchingIndex(index, self.max_batch, self.wait_s, self.adaptive)

    def image_encoder(self, encoder: ImageEncoder | None) -> ImageEncoder | None:
        if encoder is None or isinstance(encoder, BatchingEncoder):
            return encoder
        return batching_encoder(encoder, max(1, self.max_batch // 2), self.wait_s, self.adaptive)

    def text_encoder(self, encoder: TextEncoder | None) -> TextEncoder | None:
        if encoder is None or isinstance(encoder, SerialisedText):
            return encoder
        return SerialisedText(encoder)
