"""Qdrant backends: the embedded engine (``qdrant-edge-py``) and a server (``qdrant-client``).

* ``qdrant+local:/dir`` (default Qdrant): Qdrant's Rust engine in-process. Each build is an
  ``EdgeShard`` inside a versioned directory (same atomic publish as FAISS).
* ``http(s)://host:6333/<collection>``: a Qdrant server. A build writes a fresh collection
  ``<collection>__<version>`` and then moves the alias ``<collection>`` to it in one
  ``update_collection_aliases`` call, so searches never see a half-built collection.
* ``qdrant+memory://<collection>``: qdrant-client's in-process ``:memory:`` mode, which speaks
  the server API; used in tests to exercise the server code path without a server binary.

Spaces are named vectors with ``Dot`` distance (vectors are unit-length, so this is cosine and
ranks exactly like FAISS's inner product). Filters translate from :class:`SearchFilter` into
Qdrant's must / must_not conditions over indexed payload fields. Several query rows, or a
``search_batch``, go to the engine as one batch (``EdgeShard.query_batch``,
``QdrantClient.query_batch_points``): one planned pass, one round trip to a server.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import msgspec
import numpy as np

from retrieval.index.base import (
    Hit,
    IndexError_,
    IndexMeta,
    SearchFilter,
    SearchRequest,
    date_to_day,
)
from retrieval.index.versions import new_staging, open_version, publish, write_checksums
from retrieval.records import Payload
from retrieval.settings import QdrantCollectionSettings

log = logging.getLogger(__name__)

KEYWORD_FIELDS = ("study_id", "patient_id", "modality", "findings", "findings_any",
                  "anatomy_findings", "anatomy_findings_any")
HNSW_EF = 128
QUANT_OVERSAMPLING = 2.0  # quantized candidates per wanted hit, rescored with the original vectors
QUERY_BATCH = 256  # requests per batch call (bounds one call's size; a batch is one engine pass)


def translate_filter(flt: SearchFilter | None, m: ModuleType, range_cls: str) -> Any:
    """:class:`SearchFilter` -> a Qdrant ``Filter`` built from module ``m``'s classes."""
    if flt is None or flt.is_empty():
        return None
    must: list[Any] = []
    must_not: list[Any] = []

    def eq(key: str, value: Any) -> Any:
        return m.FieldCondition(key=key, match=m.MatchValue(value=value))

    def any_of(key: str, values: list[Any]) -> Any:
        return m.FieldCondition(key=key, match=m.MatchAny(any=list(values)))

    def empty(key: str) -> Any:
        if hasattr(m, "PayloadField"):  # qdrant-client models
            return m.IsEmptyCondition(is_empty=m.PayloadField(key=key))
        return m.FieldCondition(key=key, is_empty=True)  # qdrant-edge

    if flt.modality:
        must.append(any_of("modality", flt.modality))
    fkey = "findings_any" if flt.include_uncertain else "findings"
    akey = "anatomy_findings_any" if flt.include_uncertain else "anatomy_findings"
    must.extend(eq(fkey, f) for f in flt.findings or ())
    must.extend(eq(akey, f) for f in flt.anatomy_findings or ())
    if flt.patient_id is not None:
        must.append(eq("patient_id", flt.patient_id))
    if flt.study_ids is not None:
        must.append(any_of("study_id", flt.study_ids))
    if flt.exclude_patient_id is not None:
        must_not.append(eq("patient_id", flt.exclude_patient_id))
    if flt.exclude_study_ids:
        must_not.append(any_of("study_id", flt.exclude_study_ids))
    if flt.date_from is not None or flt.date_to is not None:
        rng = getattr(m, range_cls)(
            gte=float(date_to_day(flt.date_from)) if flt.date_from else None,
            lte=float(date_to_day(flt.date_to)) if flt.date_to else None)
        must.append(m.FieldCondition(key="study_day", range=rng))
    if flt.has_report is not None:
        # Not a bool match: qdrant-edge 0.9.0 matches no point on MatchValue(True/False)
        # (seen here); an empty/null test on the report field is exact on both engines.
        (must_not if flt.has_report else must).append(empty("report"))
    return m.Filter(must=must or None, must_not=must_not or None)


# ---- embedded engine ---------------------------------------------------------------------------
def _edge() -> ModuleType:
    import qdrant_edge

    return qdrant_edge


class EdgeWriter:
    def __init__(self, root: Path, spaces: dict[str, int], meta: IndexMeta, kind: str = "hnsw") -> None:
        e = _edge()
        self.root, self.spaces, self.meta, self.kind = root, dict(spaces), meta, kind
        self.staging = new_staging(root)
        # No WAL: a published version is immutable (the build flushes once, then publishes
        # atomically), and a WAL-backed shard takes an exclusive lock that would stop a second
        # reader (the API and a CLI search, or two workers) from opening the same version.
        config = e.EdgeConfig(vectors={s: e.EdgeVectorParams(size=d, distance=e.Distance.Dot)
                                       for s, d in spaces.items()}, wal_enabled=False)
        self.shard = e.EdgeShard.create(str(self.staging / "shard"), config)
        for key in KEYWORD_FIELDS:
            self.shard.update(e.UpdateOperation.create_field_index(key, e.PayloadSchemaType.Keyword))
        self.shard.update(e.UpdateOperation.create_field_index("study_day", e.PayloadSchemaType.Integer))
        self._count = 0

    def add(self, ids: np.ndarray, vectors: dict[str, np.ndarray], payloads: list[dict[str, Any]],
            present: dict[str, np.ndarray] | None = None) -> None:
        e = _edge()
        points = []
        for row, (pid, payload) in enumerate(zip(ids, payloads, strict=True)):
            vec = {s: np.asarray(v[row], dtype=np.float32).tolist() for s, v in vectors.items()
                   if present is None or present.get(s) is None or bool(present[s][row])}
            points.append(e.Point(int(pid), vec, payload))
        if points:
            self.shard.update(e.UpdateOperation.upsert_points(points))
        self._count += len(points)

    def commit(self) -> str:
        self.shard.optimize()
        self.shard.flush()
        self.shard.close()
        # The engine rewrites its config and drops journals the first time a shard is loaded:
        # settle that here, so the published files (and their checksums) stay as they are when
        # readers open them.
        _edge().EdgeShard.load(str(self.staging / "shard")).close()
        meta = msgspec.structs.replace(
            self.meta, backend="qdrant-edge", spaces=self.spaces, count=self._count, index_kind=self.kind,
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        (self.staging / "meta.json").write_bytes(msgspec.json.encode({"meta": meta}))
        write_checksums(self.staging)
        return publish(self.root, self.staging)

    def abort(self) -> None:
        try:
            self.shard.close()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)


_Item = tuple[str, np.ndarray, int, SearchFilter | None]  # space, one vector, k, filter


class _QdrantReader:
    """Search logic shared by the embedded and server readers."""

    meta: IndexMeta
    uri: str
    concurrent_reads = False  # embedded Qdrant is not documented thread-safe for concurrent calls

    def _check(self, space: str, queries: np.ndarray) -> np.ndarray:
        if space not in self.meta.spaces:
            raise IndexError_(f"index has no space {space!r}; it has: {', '.join(sorted(self.meta.spaces))}")
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if q.shape[1] != self.meta.spaces[space]:
            raise IndexError_(f"space {space!r} has dimension {self.meta.spaces[space]}, query has {q.shape[1]}")
        return q

    def __len__(self) -> int:
        return self.meta.count

    def search(self, space: str, queries: np.ndarray, k: int,
               flt: SearchFilter | None = None) -> list[list[Hit]]:
        """All rows in one batch call (per ``QUERY_BATCH``), not one call per row."""
        q = self._check(space, queries)
        return self._batched([(space, row, k, flt) for row in q])

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        return self._batched([(r.space, self._check(r.space, r.row())[0], r.k, r.flt) for r in requests])

    def _batched(self, items: list[_Item]) -> list[list[Hit]]:
        out: list[list[Hit]] = []
        for i in range(0, len(items), QUERY_BATCH):
            out.extend(self._query_batch(items[i:i + QUERY_BATCH]))
        return out

    def _query_batch(self, items: list[_Item]) -> list[list[Hit]]:
        """One engine call answering ``items`` in order (backend-specific)."""
        raise NotImplementedError


def _translated(items: list[_Item], m: ModuleType, range_cls: str) -> list[Any]:
    """Each item's Qdrant filter, translated once per distinct filter object."""
    cache: dict[int, Any] = {}
    out = []
    for _, _, _, flt in items:
        if id(flt) not in cache:
            cache[id(flt)] = translate_filter(flt, m, range_cls)
        out.append(cache[id(flt)])
    return out


def _payload(raw: Any) -> Payload:
    """A stored payload (JSON builtins, as the engine returns it) as its type: the one conversion
    per point read; everything above the index reads fields."""
    return msgspec.convert(raw or {}, Payload)


def _hits(points: Any) -> list[Hit]:
    return [Hit(int(p.id), float(p.score), _payload(p.payload)) for p in points]


class EdgeIndex(_QdrantReader):
    """Reader of an embedded-Qdrant version.

    The engine opens its segment files read-write (memory-mapped) even to search, so a version
    on a read-only mount (a hospital's shared, write-protected index volume) cannot be loaded in
    place: it is then copied to a private temporary folder first (logged; removed on close).
    A version that fails its checksums, or that the engine refuses, is an :class:`IndexError_`.
    """

    def __init__(self, root: Path, uri: str) -> None:
        e = _edge()
        self.uri = uri
        self.path = open_version(root)
        self._private: Path | None = None
        try:
            raw = json.loads((self.path / "meta.json").read_text())
            self.meta = msgspec.structs.replace(msgspec.convert(raw["meta"], IndexMeta), version=self.path.name)
        except (OSError, ValueError, KeyError, msgspec.ValidationError) as exc:
            raise IndexError_(f"version {self.path.name}: meta.json is unreadable ({type(exc).__name__})") from exc
        shard = self.path / "shard"
        if not os.access(shard, os.W_OK):
            shard = self._private_copy(shard)
        try:
            self.shard = e.EdgeShard.load(str(shard))
        except Exception as exc:  # the engine raises a bare Exception with its own message
            self._drop_private()
            raise IndexError_(f"version {self.path.name}: the embedded Qdrant engine cannot open it "
                              f"({str(exc).splitlines()[0][:300]})") from exc

    def _private_copy(self, shard: Path) -> Path:
        import tempfile

        log.warning("index version %s is read-only; searching a private copy", self.path.name)
        self._private = Path(tempfile.mkdtemp(prefix="medrag-edge-"))
        try:
            return Path(shutil.copytree(shard, self._private / "shard"))
        except OSError as exc:
            self._drop_private()
            raise IndexError_(f"version {self.path.name} is read-only and could not be copied to "
                              f"a private folder ({exc.strerror or type(exc).__name__})") from exc

    def _drop_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    def _query_batch(self, items: list[_Item]) -> list[list[Hit]]:
        if not items:
            return []
        e = _edge()
        exact = self.meta.index_kind == "flat"
        reqs = [e.QueryRequest(limit=k, query=e.Query.Nearest(vec.tolist(), using=space), filter=f,
                               with_payload=True, params=e.SearchParams(exact=exact, hnsw_ef=max(HNSW_EF, 2 * k)))
                for (space, vec, k, _), f in zip(items, _translated(items, e, "RangeFloat"), strict=True)]
        return [_hits(points) for points in self.shard.query_batch(e.QueryBatchRequest(reqs))]

    def payloads(self, ids: Sequence[int]) -> list[Payload]:
        recs = {int(r.id): _payload(r.payload) for r in self.shard.retrieve([int(i) for i in ids], True, False)}
        return [recs[int(i)] for i in ids]

    def find(self, flt: SearchFilter, limit: int = 100) -> list[Hit]:
        e = _edge()
        recs, _ = self.shard.scroll(e.ScrollRequest(limit=limit, filter=translate_filter(flt, e, "RangeFloat"),
                                                    with_payload=True))
        return [Hit(int(r.id), 0.0, _payload(r.payload)) for r in recs]

    def vectors(self, space: str, ids: Sequence[int]) -> np.ndarray:
        self._check(space, np.zeros((1, self.meta.spaces.get(space, 1)), np.float32))
        recs = {int(r.id): r for r in self.shard.retrieve([int(i) for i in ids], False, [space])}
        rows = []
        for i in ids:
            vec = recs[int(i)].vector if int(i) in recs else None
            v = vec.get(space) if isinstance(vec, dict) else vec
            if v is None:
                raise IndexError_(f"point {i} has no vector in space {space!r}")
            rows.append(np.asarray(v, dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.meta.spaces[space]), np.float32)

    def close(self) -> None:
        try:
            self.shard.close()
        finally:
            self._drop_private()


# ---- server (qdrant-client) --------------------------------------------------------------------
_MEMORY_CLIENTS: dict[str, Any] = {}


def collection_config(spaces: dict[str, int], cfg: QdrantCollectionSettings) -> dict[str, Any]:
    """The ``create_collection`` arguments of a server collection, from the deployment's settings.

    Shards spread a collection over a cluster's nodes, replicas keep it searchable when a node
    fails; ``on_disk`` memory-maps vectors (RAM holds the HNSW graph and, with quantization, the
    compact codes); quantized search is rescored with the original vectors (see ``search_params``).
    """
    from qdrant_client import models as qm

    quant: Any = None
    if cfg.quantization == "scalar":
        quant = qm.ScalarQuantization(scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99,
                                                                        always_ram=True))
    elif cfg.quantization == "binary":
        quant = qm.BinaryQuantization(binary=qm.BinaryQuantizationConfig(always_ram=True))
    return {
        "vectors_config": {s: qm.VectorParams(size=d, distance=qm.Distance.DOT, on_disk=cfg.on_disk or None)
                           for s, d in spaces.items()},
        "shard_number": cfg.shard_number,
        "replication_factor": cfg.replication_factor,
        "write_consistency_factor": max(1, cfg.replication_factor // 2 + 1) if cfg.replication_factor > 1 else None,
        "on_disk_payload": cfg.on_disk or None,
        "quantization_config": quant,
    }


def search_params(exact: bool, k: int, cfg: QdrantCollectionSettings) -> Any:
    """Per-query parameters: ``hnsw_ef`` and, on a quantized collection, rescoring with oversampling."""
    from qdrant_client import models as qm

    quant = None
    if cfg.quantization != "none":
        quant = qm.QuantizationSearchParams(rescore=cfg.rescore, oversampling=QUANT_OVERSAMPLING)
    return qm.SearchParams(exact=exact, hnsw_ef=max(HNSW_EF, 2 * k), quantization=quant)


def server_client(location: str, api_key: str | None = None) -> Any:
    """A qdrant-client for a URL, or a process-wide ``:memory:`` client for ``memory://name``."""
    from qdrant_client import QdrantClient

    if location.startswith("memory://"):
        name = location[len("memory://"):]
        if name not in _MEMORY_CLIENTS:
            _MEMORY_CLIENTS[name] = QdrantClient(location=":memory:")
        return _MEMORY_CLIENTS[name]
    return QdrantClient(url=location, api_key=api_key, timeout=30)


class ServerWriter:
    def __init__(self, client: Any, collection: str, spaces: dict[str, int], meta: IndexMeta,
                 kind: str = "hnsw", payload_indexes: bool = True,
                 settings: QdrantCollectionSettings | None = None) -> None:
        from qdrant_client import models as qm

        self.client, self.alias, self.spaces, self.meta, self.kind = client, collection, dict(spaces), meta, kind
        existing = {c.name for c in client.get_collections().collections}
        n = 1
        while f"{collection}__v{n:06d}" in existing:
            n += 1
        self.collection = f"{collection}__v{n:06d}"
        self.settings = settings or QdrantCollectionSettings()
        client.create_collection(self.collection, **collection_config(spaces, self.settings))
        if payload_indexes:  # qdrant-client's :memory: mode ignores them (and warns)
            for key in KEYWORD_FIELDS:
                client.create_payload_index(self.collection, key, qm.PayloadSchemaType.KEYWORD)
            client.create_payload_index(self.collection, "study_day", qm.PayloadSchemaType.INTEGER)
        self._count = 0

    def add(self, ids: np.ndarray, vectors: dict[str, np.ndarray], payloads: list[dict[str, Any]],
            present: dict[str, np.ndarray] | None = None) -> None:
        from qdrant_client import models as qm

        points = []
        for row, (pid, payload) in enumerate(zip(ids, payloads, strict=True)):
            vec = {s: np.asarray(v[row], dtype=np.float32).tolist() for s, v in vectors.items()
                   if present is None or present.get(s) is None or bool(present[s][row])}
            points.append(qm.PointStruct(id=int(pid), vector=vec, payload=payload))
        if points:
            self.client.upsert(self.collection, points=points, wait=True)
        self._count += len(points)

    def commit(self) -> str:
        from qdrant_client import models as qm

        meta = msgspec.structs.replace(
            self.meta, backend="qdrant-server", spaces=self.spaces, count=self._count, index_kind=self.kind,
            version=self.collection.rsplit("__", 1)[1],
            created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))
        self.client.update_collection(self.collection, metadata={"medrag": msgspec.to_builtins(meta)})
        old = [a.collection_name for a in self.client.get_aliases().aliases if a.alias_name == self.alias]
        ops: list[Any] = [qm.DeleteAliasOperation(delete_alias=qm.DeleteAlias(alias_name=self.alias))] if old else []
        ops.append(qm.CreateAliasOperation(create_alias=qm.CreateAlias(collection_name=self.collection,
                                                                         alias_name=self.alias)))
        self.client.update_collection_aliases(change_aliases_operations=ops)
        for name in old:
            if name != self.collection:
                self.client.delete_collection(name)
        return meta.version

    def abort(self) -> None:
        self.client.delete_collection(self.collection)


class ServerIndex(_QdrantReader):
    def __init__(self, client: Any, collection: str, uri: str) -> None:
        self.client, self.collection, self.uri = client, collection, uri
        self._local = uri.startswith("qdrant+memory://")  # exact search; search params ignored
        try:
            info = client.get_collection(collection)
        except Exception as exc:
            raise IndexError_(f"{uri}: no collection or alias {collection!r} ({exc})") from exc
        raw = (info.config.metadata or {}).get("medrag")
        if raw is None:
            raise IndexError_(f"{uri}: collection {collection!r} was not built by medrag (no metadata)")
        self.meta = msgspec.convert(raw, IndexMeta)
        quant = info.config.quantization_config  # what the server holds, not today's settings
        kind = "scalar" if getattr(quant, "scalar", None) else "binary" if getattr(quant, "binary", None) else "none"
        self._params_cfg = QdrantCollectionSettings(quantization=kind)

    def _query_batch(self, items: list[_Item]) -> list[list[Hit]]:
        from qdrant_client import models as qm

        if not items:
            return []
        exact = self.meta.index_kind == "flat"
        cfg = self._params_cfg
        reqs = [qm.QueryRequest(query=vec.tolist(), using=space, limit=k, filter=f, with_payload=True,
                                params=None if self._local else search_params(exact, k, cfg))
                for (space, vec, k, _), f in zip(items, _translated(items, qm, "Range"), strict=True)]
        return [_hits(res.points) for res in self.client.query_batch_points(self.collection, requests=reqs)]

    def payloads(self, ids: Sequence[int]) -> list[Payload]:
        recs = {int(r.id): _payload(r.payload) for r in
                self.client.retrieve(self.collection, [int(i) for i in ids], with_payload=True)}
        return [recs[int(i)] for i in ids]

    def find(self, flt: SearchFilter, limit: int = 100) -> list[Hit]:
        from qdrant_client import models as qm

        recs, _ = self.client.scroll(self.collection, scroll_filter=translate_filter(flt, qm, "Range"),
                                     limit=limit, with_payload=True)
        return [Hit(int(r.id), 0.0, _payload(r.payload)) for r in recs]

    def vectors(self, space: str, ids: Sequence[int]) -> np.ndarray:
        self._check(space, np.zeros((1, self.meta.spaces.get(space, 1)), np.float32))
        recs = {int(r.id): r for r in self.client.retrieve(self.collection, [int(i) for i in ids], with_vectors=[space])}
        rows = []
        for i in ids:
            vec = recs[int(i)].vector if int(i) in recs else None
            v = vec.get(space) if isinstance(vec, dict) else None
            if v is None:
                raise IndexError_(f"point {i} has no vector in space {space!r}")
            rows.append(np.asarray(v, dtype=np.float32))
        return np.stack(rows) if rows else np.zeros((0, self.meta.spaces[space]), np.float32)

    def close(self) -> None:
        pass

