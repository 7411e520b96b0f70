"""Qdrant at cluster scale, up to the wire: the settings read from the environment, the
``create_collection`` request a build sends, the payload indexes on every filter field, and the
per-query parameters of a quantized collection. No Qdrant server binary runs here, so the
request is checked on a recording client (and the whole path on qdrant-client's ``:memory:``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from qdrant_client import models as qm

from retrieval.index import IndexMeta, open_index, open_writer
from retrieval.index.qdrant_index import (
    KEYWORD_FIELDS,
    ServerWriter,
    collection_config,
    search_params,
)
from retrieval.settings import QdrantCollectionSettings, env


class Recorder:
    """Records what a qdrant-client would send (method and arguments); answers like an empty server."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def get_collections(self) -> Any:
        return qm.CollectionsResponse(collections=[qm.CollectionDescription(name="cxr__v000001")])

    def __getattr__(self, name: str) -> Any:
        def record(*args: Any, **kw: Any) -> None:
            self.calls.append((name, args, kw))
        return record


def test_settings_come_from_the_environment(monkeypatch):
    for k in ("MEDRAG_QDRANT_SHARDS", "MEDRAG_QDRANT_REPLICAS", "MEDRAG_QDRANT_ON_DISK", "MEDRAG_QDRANT_QUANTIZATION"):
        monkeypatch.delenv(k, raising=False)
    assert env().qdrant == QdrantCollectionSettings(1, 1, False, "none")
    monkeypatch.setenv("MEDRAG_QDRANT_SHARDS", "6")
    monkeypatch.setenv("MEDRAG_QDRANT_REPLICAS", "2")
    monkeypatch.setenv("MEDRAG_QDRANT_ON_DISK", "yes")
    monkeypatch.setenv("MEDRAG_QDRANT_QUANTIZATION", "Scalar")
    assert env().qdrant == QdrantCollectionSettings(6, 2, True, "scalar")


@pytest.mark.parametrize(("var", "value", "message"), [
    ("MEDRAG_QDRANT_SHARDS", "three", "MEDRAG_QDRANT_SHARDS='three': expected an integer"),
    ("MEDRAG_QDRANT_REPLICAS", "0", "must be >= 1"),
    ("MEDRAG_QDRANT_ON_DISK", "maybe", "MEDRAG_QDRANT_ON_DISK='maybe'"),
    ("MEDRAG_QDRANT_QUANTIZATION", "pq", "MEDRAG_QDRANT_QUANTIZATION='pq': expected one of none, scalar, binary")])
def test_bad_settings_name_the_variable(var, value, message, monkeypatch):
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        env()


def test_a_cluster_build_sends_shards_replicas_on_disk_quantization_and_every_payload_index():
    rec = Recorder()
    spaces = {"image": 512, "report": 384}
    cfg = QdrantCollectionSettings(shard_number=6, replication_factor=2, on_disk=True, quantization="scalar")
    w = ServerWriter(rec, "cxr", spaces, IndexMeta(backend="", spaces=spaces, count=0), settings=cfg)
    assert w.collection == "cxr__v000002"  # v000001 exists: a new version never overwrites it
    name, args, kw = rec.calls[0]
    assert name == "create_collection" and args == ("cxr__v000002",)
    assert kw["shard_number"] == 6 and kw["replication_factor"] == 2 and kw["write_consistency_factor"] == 2
    assert kw["on_disk_payload"] is True
    assert kw["vectors_config"] == {s: qm.VectorParams(size=d, distance=qm.Distance.DOT, on_disk=True)
                                    for s, d in spaces.items()}
    assert kw["quantization_config"] == qm.ScalarQuantization(
        scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8, quantile=0.99, always_ram=True))
    indexed = {(args[1], args[2]) for name, args, _ in rec.calls if name == "create_payload_index"}
    assert indexed == {(f, qm.PayloadSchemaType.KEYWORD) for f in KEYWORD_FIELDS} | \
        {("study_day", qm.PayloadSchemaType.INTEGER)}
    # every field translate_filter can put in a condition is indexed (report: an is-empty test only)
    assert {"modality", "findings", "findings_any", "anatomy_findings", "anatomy_findings_any", "patient_id",
            "study_id", "study_day"} <= {f for f, _ in indexed}


def test_the_request_bodies_serialise_as_the_rest_api_expects():
    def wire_of(body: dict[str, Any]) -> dict[str, Any]:  # qdrant-client sends vectors_config as "vectors"
        body = dict(body, vectors=body.pop("vectors_config"))
        return qm.CreateCollection(**body).model_dump(exclude_none=True, mode="json")

    wire = wire_of(collection_config({"image": 8}, QdrantCollectionSettings(3, 2, False, "binary")))
    assert wire == {"vectors": {"image": {"size": 8, "distance": "Dot"}}, "shard_number": 3,
                    "replication_factor": 2, "write_consistency_factor": 2,
                    "quantization_config": {"binary": {"always_ram": True}}}
    default = wire_of(collection_config({"image": 8}, QdrantCollectionSettings()))
    assert default == {"vectors": {"image": {"size": 8, "distance": "Dot"}}, "shard_number": 1,
                       "replication_factor": 1}


def test_quantized_search_rescores_with_oversampling_and_plain_search_does_not():
    q = search_params(False, 10, QdrantCollectionSettings(quantization="scalar"))
    assert q.quantization == qm.QuantizationSearchParams(rescore=True, oversampling=2.0) and q.hnsw_ef == 128
    assert search_params(True, 100, QdrantCollectionSettings()).model_dump(exclude_none=True) == \
        {"hnsw_ef": 200, "exact": True, "indexed_only": False}


def test_the_uri_path_uses_the_settings_end_to_end_in_memory(monkeypatch):
    monkeypatch.setenv("MEDRAG_QDRANT_SHARDS", "2")
    monkeypatch.setenv("MEDRAG_QDRANT_QUANTIZATION", "scalar")
    spaces = {"image": 4}
    w = open_writer("qdrant+memory://cluster-settings", spaces, IndexMeta(backend="", spaces=spaces, count=0), "hnsw")
    assert w.settings == QdrantCollectionSettings(2, 1, False, "scalar")
    x = np.eye(4, dtype=np.float32)
    w.add(np.arange(4), {"image": x}, [{"study_id": f"s{i}"} for i in range(4)])
    w.commit()
    ix = open_index("qdrant+memory://cluster-settings")  # :memory: keeps no quantization (exact search)
    assert [h.id for h in ix.search("image", x[2:3], 1)[0]] == [2]


def test_a_reader_takes_quantization_from_the_collection_not_the_environment(monkeypatch):
    from types import SimpleNamespace

    from retrieval.index.qdrant_index import ServerIndex

    monkeypatch.setenv("MEDRAG_QDRANT_QUANTIZATION", "binary")
    meta = {"backend": "qdrant-server", "spaces": {"image": 4}, "count": 4, "index_kind": "hnsw"}
    sent: list[Any] = []

    class Server(Recorder):
        def get_collection(self, name: str) -> Any:
            return SimpleNamespace(config=SimpleNamespace(metadata={"medrag": meta}, quantization_config=qm.ScalarQuantization(
                scalar=qm.ScalarQuantizationConfig(type=qm.ScalarType.INT8))))

        def query_batch_points(self, collection: str, requests: list[Any]) -> list[Any]:
            sent.extend(requests)
            return [SimpleNamespace(points=[]) for _ in requests]

    ix = ServerIndex(Server(), "cxr", "http://node1:6333/cxr")
    ix.search("image", np.ones((1, 4), np.float32), 5)
    assert sent[0].params.quantization == qm.QuantizationSearchParams(rescore=True, oversampling=2.0)


def test_the_cluster_compose_file_has_three_clustered_nodes_bootstrapped_from_the_first():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    doc = yaml.safe_load((Path(__file__).parents[1] / "deploy/qdrant-cluster/docker-compose.yml").read_text())
    nodes = doc["services"]
    assert sorted(nodes) == ["qdrant-1", "qdrant-2", "qdrant-3"]
    for name, svc in nodes.items():
        assert svc["environment"]["QDRANT__CLUSTER__ENABLED"] == "true"
        assert "QDRANT_API_KEY" in svc["environment"]["QDRANT__SERVICE__API_KEY"]
        assert f"--uri http://{name}:6335" in svc["command"]
        assert (name == "qdrant-1") != ("--bootstrap http://qdrant-1:6335" in svc["command"])
