"""Vector indexes behind one protocol, chosen by URI (see :func:`open_index`).

=============================  ==========================================================
``faiss:/dir``                 FAISS (flat / HNSW / IVF), versioned directory
``qdrant+local:/dir``          Qdrant's Rust engine embedded in-process (qdrant-edge)
``qdrant:/dir``                same as ``qdrant+local:``
``http(s)://host:6333/name``   a Qdrant server; ``name`` is the collection alias
``qdrant+memory://name``       qdrant-client's in-process ``:memory:`` mode (tests)
``/dir``                       a published directory; the backend is read from its metadata
=============================  ==========================================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from retrieval.index.base import (
    IMAGE,
    REPORT,
    REPORT_JOINT,
    Hit,
    IndexError_,
    IndexMeta,
    IndexWriter,
    SearchFilter,
    VectorIndex,
    anatomy_space,
)
from retrieval.settings import env


@dataclass(frozen=True)
class IndexLocation:
    backend: str  # "faiss" | "qdrant-edge" | "qdrant-server"
    path: Path | None = None
    server: str | None = None  # URL or "memory://name"
    collection: str | None = None


def parse_uri(uri: str) -> IndexLocation:
    if uri.startswith("faiss:"):
        return IndexLocation("faiss", path=Path(uri[len("faiss:"):]))
    for prefix in ("qdrant+local:", "qdrant:"):
        if uri.startswith(prefix):
            return IndexLocation("qdrant-edge", path=Path(uri[len(prefix):]))
    if uri.startswith("qdrant+memory://"):
        name = uri[len("qdrant+memory://"):] or "medrag"
        return IndexLocation("qdrant-server", server=f"memory://{name}", collection=name)
    if uri.startswith(("http://", "https://")):
        from urllib.parse import urlsplit

        parts = urlsplit(uri)
        collection = parts.path.strip("/") or "medrag"
        return IndexLocation("qdrant-server", server=f"{parts.scheme}://{parts.netloc}", collection=collection)
    path = Path(uri)
    if (path / "CURRENT").is_file():
        from retrieval.index.versions import current_version

        raw = json.loads((current_version(path) / "meta.json").read_text())
        backend = raw["meta"]["backend"]
        return IndexLocation(backend, path=path)
    raise IndexError_(f"cannot tell the backend of {uri!r}: use faiss:/dir, qdrant+local:/dir, "
                      "http://host:6333/collection, or the directory of a published index")


# ---- the backend registry: one entry per backend ---------------------------------------------
def _faiss_reader(loc: IndexLocation, uri: str, gpu: bool) -> VectorIndex:
    from retrieval.index.faiss_index import FaissIndex

    return FaissIndex(loc.path, uri, gpu=gpu)  # type: ignore[arg-type]


def _faiss_writer(loc: IndexLocation, spaces: dict[str, int], meta: IndexMeta, kind: str) -> IndexWriter:
    from retrieval.index.faiss_index import FaissWriter

    return FaissWriter(loc.path, spaces, meta, kind)  # type: ignore[arg-type]


def _edge_reader(loc: IndexLocation, uri: str, gpu: bool) -> VectorIndex:
    from retrieval.index.qdrant_index import EdgeIndex

    return EdgeIndex(loc.path, uri)  # type: ignore[arg-type]


def _edge_writer(loc: IndexLocation, spaces: dict[str, int], meta: IndexMeta, kind: str) -> IndexWriter:
    from retrieval.index.qdrant_index import EdgeWriter

    return EdgeWriter(loc.path, spaces, meta, kind)  # type: ignore[arg-type]


def _server_reader(loc: IndexLocation, uri: str, gpu: bool) -> VectorIndex:
    from retrieval.index.qdrant_index import ServerIndex, server_client

    client = server_client(loc.server or "", api_key=env().qdrant_api_key)
    return ServerIndex(client, loc.collection or "medrag", uri)


def _server_writer(loc: IndexLocation, spaces: dict[str, int], meta: IndexMeta, kind: str) -> IndexWriter:
    from retrieval.index.qdrant_index import ServerWriter, server_client

    client = server_client(loc.server or "", api_key=env().qdrant_api_key)
    return ServerWriter(client, loc.collection or "medrag", spaces, meta, kind,
                        payload_indexes=not (loc.server or "").startswith("memory://"), settings=env().qdrant)


@dataclass(frozen=True)
class Backend:
    """How to open one kind of index; heavy engines are imported only when opened."""

    reader: Callable[[IndexLocation, str, bool], VectorIndex]
    writer: Callable[[IndexLocation, dict[str, int], IndexMeta, str], IndexWriter]
    default_kind: str


BACKENDS: dict[str, Backend] = {
    "faiss": Backend(_faiss_reader, _faiss_writer, "flat"),
    "qdrant-edge": Backend(_edge_reader, _edge_writer, "hnsw"),
    "qdrant-server": Backend(_server_reader, _server_writer, "hnsw"),
}
DEFAULT_KIND = {name: b.default_kind for name, b in BACKENDS.items()}


def open_index(uri: str, gpu: bool = False) -> VectorIndex:
    """Open the published (current) version of the index at ``uri`` for reading."""
    loc = parse_uri(uri)
    return BACKENDS[loc.backend].reader(loc, uri, gpu)


def published_version(uri: str) -> str | None:
    """The version a fresh :func:`open_index` would serve now (None: nothing published yet).

    Cheap (one small file read, or one alias listing on a Qdrant server): the API polls it to
    pick up each newly published version, deletions included.
    """
    try:
        loc = parse_uri(uri)
    except IndexError_:
        return None
    if loc.path is not None:
        from retrieval.index.versions import published_version as current_name

        return current_name(loc.path)
    from retrieval.index.qdrant_index import server_client

    client = server_client(loc.server or "", api_key=env().qdrant_api_key)
    for alias in client.get_aliases().aliases:
        if alias.alias_name == (loc.collection or "medrag"):
            return str(alias.collection_name).rsplit("__", 1)[-1]
    return None


def open_writer(uri: str, spaces: dict[str, int], meta: IndexMeta, kind: str | None = None) -> IndexWriter:
    """Start a new version of the index at ``uri``; nothing is visible until ``commit()``."""
    loc = parse_uri(uri)
    backend = BACKENDS[loc.backend]
    return backend.writer(loc, spaces, meta, kind or backend.default_kind)


__all__ = ["IMAGE", "REPORT", "REPORT_JOINT", "Hit", "IndexError_", "IndexMeta", "IndexWriter",
           "SearchFilter", "VectorIndex", "anatomy_space", "open_index", "open_writer", "parse_uri",
           "published_version"]
