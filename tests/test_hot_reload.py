"""The running API follows the index: each newly published version is served (deletions honoured
within the poll interval), a damaged state answers 503 with a reason (never an exit), and the
unauthenticated ``/health`` never shows where the index lives.

Reproduces issue 13's findings: after `medrag index delete --study X` the server returned X's
report until restart; a truncated ``.faiss`` file, an embedded-Qdrant version with a segment
missing and a read-only mount made the service exit or serve "ok" with 0 studies; /health showed
the absolute index path when startup failed.
"""

from __future__ import annotations

import shutil
import time

import anyio
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app, public_reason
from api.keys import add_key
from api.settings import Settings
from eval.synthetic import generate
from indexer.build import BuildConfig, build_index, delete_studies
from indexer.verify import verify_index
from retrieval.index.versions import current_version

pytestmark = pytest.mark.anyio
CFG = BuildConfig(encoder="pixels", conditioning=("left lung",), text_encoder=None)
POLL = 0.2


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate(tmp_path_factory.mktemp("reload") / "synth", 12, seed=4, size=64)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, {"Authorization": f"Bearer {add_key(path, 'reader')}"}


def client(uri: str, keys, **over) -> AsyncTestClient:
    return AsyncTestClient(app=create_app(Settings(index=uri, api_keys_file=str(keys[0]), reload_interval_s=POLL,
                                                   reload_grace_s=0.5, **over)))


async def wait_for(c: AsyncTestClient, pred, timeout: float = 20.0) -> dict:
    """Poll /health until ``pred(health)``; the figure a deployment cares about is how long."""
    t0 = time.perf_counter()
    while True:
        h = (await c.get("/health")).json()
        if pred(h):
            h["_waited_s"] = time.perf_counter() - t0
            return h
        if time.perf_counter() - t0 > timeout:
            raise AssertionError(f"/health never got there: {h}")
        await anyio.sleep(0.05)


@pytest.mark.parametrize("backend", ["faiss", "qdrant+local"])
async def test_deleted_study_is_gone_without_a_restart(synth, keys, tmp_path, backend):
    uri = f"{backend}:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False)
    async with client(uri, keys) as c:
        h = (await c.get("/health")).json()
        assert h["index"]["version"] == "v000001" and h["index"]["studies"] == 12
        victim = "syn00003"
        assert (await c.get(f"/api/cases/{victim}", headers=keys[1])).status_code == 200
        delete_studies(uri, [victim])
        h = await wait_for(c, lambda h: h["index"]["version"] == "v000002")
        assert h["index"]["studies"] == 11 and h["reload_error"] is None
        assert h["_waited_s"] < 10 * POLL + 5  # the interval plus the time to open a small index
        assert (await c.get(f"/api/cases/{victim}", headers=keys[1])).status_code == 404
        res = (await c.get("/api/studies/syn00004/similar?k=11", headers=keys[1])).json()
        assert victim not in {hit["study_id"] for hit in res["hits"]}


async def test_damaged_new_version_is_not_served_and_health_says_why(synth, keys, tmp_path):
    uri = f"faiss:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False)
    async with client(uri, keys) as c:
        await wait_for(c, lambda h: h["ready"])
        # a writer on another host publishes a version whose file is damaged in transit
        v2 = tmp_path / "ix" / "versions" / "v000002"
        shutil.copytree(current_version(tmp_path / "ix"), v2)
        f = next(v2.glob("*.faiss"))
        f.write_bytes(f.read_bytes()[:64])
        (tmp_path / "ix" / "CURRENT").write_text("v000002\n")
        h = await wait_for(c, lambda h: h.get("reload_error"))
        assert h["status"] == "ok" and h["index"]["version"] == "v000001"  # the old one keeps serving
        assert "v000002" in h["reload_error"] and "truncated" in h["reload_error"]
        assert str(tmp_path) not in str(h)
        assert (await c.get("/api/cases/syn00001", headers=keys[1])).status_code == 200
        # repaired: the next poll serves it
        assert verify_index(uri, repair=True).repaired
        h = await wait_for(c, lambda h: h["index"]["version"] == "v000003")
        assert h["reload_error"] is None


@pytest.mark.parametrize("damage", ["truncated-faiss", "missing-qdrant-segment", "no-current"])
async def test_unreadable_state_is_503_with_a_reason_then_recovers(synth, keys, tmp_path, damage):
    backend = "qdrant+local" if "qdrant" in damage else "faiss"
    uri = f"{backend}:{tmp_path}/ix"
    if damage != "no-current":
        build_index(synth, uri, CFG, progress=False)
        version = current_version(tmp_path / "ix")
        if damage == "truncated-faiss":
            f = next(version.glob("*.faiss"))
            f.write_bytes(f.read_bytes()[:100])
        else:
            shutil.rmtree(next((version / "shard" / "segments").iterdir()))
    async with client(uri, keys) as c:
        h = (await c.get("/health")).json()
        assert h["status"] == "error" and not h["ready"]
        why = {"truncated-faiss": "truncated", "missing-qdrant-segment": "missing", "no-current": "no published index"}
        assert why[damage] in h["detail"], h
        assert str(tmp_path) not in h["detail"]  # no absolute path to an unauthenticated client
        r = await c.get("/api/taxonomy", headers=keys[1])
        assert r.status_code == 503 and str(tmp_path) not in r.text
        # the admin heals it; the service becomes ready without a restart
        if damage == "no-current":
            build_index(synth, uri, CFG, progress=False)
        else:
            assert verify_index(uri, repair=True).repaired
        h = await wait_for(c, lambda h: h["ready"])
        assert h["index"]["studies"] == 12
        assert (await c.get("/api/taxonomy", headers=keys[1])).status_code == 200


def test_public_reason_hides_paths_only():
    msg = ("no published index at /srv/pacs/MRN-8675300_Zzyzx/idx (missing CURRENT); "
           "version v000002: 0.faiss: 64 bytes, expected 4141 (truncated or replaced)")
    out = public_reason(msg)
    assert "/srv" not in out and "MRN-8675300" not in out
    assert out.startswith("no published index at <path> (missing CURRENT)")
    assert "0.faiss: 64 bytes, expected 4141" in out


async def test_a_version_repaired_in_place_is_tried_again(synth, keys, tmp_path):
    """A failed version is retried every reload_retry_s: freeing a full disk or restoring a file
    in place (no new version published) must not leave the service unready forever."""
    uri = f"faiss:{tmp_path}/ix"
    build_index(synth, uri, CFG, progress=False)
    f = next(current_version(tmp_path / "ix").glob("*.faiss"))
    good = f.read_bytes()
    f.write_bytes(good[:100])
    async with client(uri, keys, reload_retry_s=0.5) as c:
        h = (await c.get("/health")).json()
        assert not h["ready"] and "truncated" in h["detail"]
        f.write_bytes(good)  # the admin restores the file from a backup
        h = await wait_for(c, lambda h: h["ready"])
        assert h["index"]["version"] == "v000001"
