"""The Litestar service: every endpoint, auth failures, hostile uploads, limits, metrics, no PHI in logs."""

from __future__ import annotations

import io
import logging
import os
import stat
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.keys import KeyStore, add_key, digest
from api.settings import Settings

from .conftest import SMALL_DATE, SMALL_LEFT, SMALL_NORMAL, SMALL_PATIENT, synthetic_cxr

pytestmark = pytest.mark.anyio

PATIENT, DATE, LEFT, NORMAL = SMALL_PATIENT, SMALL_DATE, SMALL_LEFT, SMALL_NORMAL  # the shared index's


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def index_dir(small_index):
    return small_index  # conftest.py: built once per session, shared with other files


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, add_key(path, "reader-1")


def _client(uri, key_file, **over):
    s = Settings(index=uri, api_keys_file=str(key_file[0]), **over)
    return AsyncTestClient(app=create_app(s))


def _auth(key_file):
    return {"Authorization": f"Bearer {key_file[1]}"}


def _png(arr) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype("uint8"), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def test_key_file_stores_only_hashes(key_file):
    path, key = key_file
    text = path.read_text()
    assert key not in text and digest(key) in text
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    store = KeyStore.load(path)
    assert store.verify(f"Bearer {key}") == "reader-1"
    assert store.verify(f"Bearer {key}x") is None and store.verify(key) is None and store.verify(None) is None


async def test_health_metrics_schema_and_page_need_no_key(index_dir, key_file):
    async with _client(index_dir[1], key_file) as c:
        h = (await c.get("/health")).json()
        assert h["ready"] and h["index"]["points"] == 17 and h["index"]["studies"] == 17
        assert "image@left lung" in h["index"]["spaces"]
        assert (await c.get("/health/ready")).status_code == 200 and (await c.get("/health/live")).status_code == 200
        page = await c.get("/")
        assert page.status_code == 200 and 'id="drop"' in page.text
        assert (await c.get("/static/app.js")).status_code == 200
        schema = (await c.get("/schema/openapi.json")).json()
        assert "/api/search/image" in schema["paths"] and "/api/draft" in schema["paths"]
        await c.get("/api/cases/s0", headers=_auth(key_file))
        metrics = (await c.get("/metrics")).text
        assert "medrag_request_duration_seconds_bucket" in metrics and "medrag_requests_total" in metrics
        assert 'path="/api/cases/{study_id}"' in metrics and "/api/cases/s0" not in metrics


DATA_ROUTES = [("GET", "/api/taxonomy"), ("POST", "/api/search/image"), ("POST", "/api/search/text"),
               ("POST", "/api/search/vector"), ("GET", "/api/studies/s0/similar"), ("GET", "/api/cases/s0"),
               ("GET", "/api/cases/s0/images/0"), ("POST", "/api/draft")]


@pytest.mark.parametrize("method, path", DATA_ROUTES)
async def test_every_data_route_needs_a_valid_key(index_dir, key_file, method, path):
    async with _client(index_dir[1], key_file) as c:
        for headers in ({}, {"Authorization": "Bearer mrk_wrong"}, {"Authorization": f"Basic {key_file[1]}"}):
            r = await c.request(method, path, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert "API key" in r.json()["detail"]


async def test_search_by_upload_conditioned_and_filtered(index_dir, key_file):
    root, uri = index_dir
    async with _client(uri, key_file) as c:
        files = {"image": ("anything.bin", (root / "img" / "s2.png").read_bytes(), "application/octet-stream")}
        r = await c.post("/api/search/image", files=files, data={"anatomy": "left lung", "k": "5"}, headers=_auth(key_file))
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["space"] == "image@left lung" and res["conditioning"] == "embedding:left lung"
        # the uploaded pixels are s2's: s2 itself is never a result of its own query
        assert res["hits"] and "s2" not in {h["study_id"] for h in res["hits"]}
        assert res["hits"][0]["thumbnail"] == f"/api/cases/{res['hits'][0]['study_id']}/images/0"
        r = await c.post("/api/search/image", files=files, data={"finding": "effusion", "k": "20"},
                         headers=_auth(key_file))
        res = r.json()
        assert {h["study_id"] for h in res["hits"]} == {f"s{i}" for i in range(0, 16, 2)} - {"s2"}
        top = res["hits"][0]
        assert top["matched_entities"] == [{"anatomy": "left pleura", "finding": "effusion", "status": "present"}]
        marked = [top["report"][h["start"]:h["end"]] for h in top["highlights"] if h["matched"]]
        assert marked and all("effusion" in m for m in marked)
        dcm = {"image": ("x.png", (root / "img" / "ct.dcm").read_bytes(), "image/png")}  # type by content
        r = await c.post("/api/search/image", files=dcm, data={"k": "3"}, headers=_auth(key_file))
        assert r.status_code == 200, r.text  # decoded as DICOM whatever the name and content type say
        assert r.json()["hits"] and "ct1" not in {h["study_id"] for h in r.json()["hits"]}  # its own pixels


async def test_other_queries_case_detail_and_thumbnails(index_dir, key_file):
    async with _client(index_dir[1], key_file) as c:
        h = _auth(key_file)
        sim = (await c.get("/api/studies/s0/similar?anatomy=left%20lung&k=3&other_patients=true", headers=h)).json()
        assert "s0" not in [x["study_id"] for x in sim["hits"]] and "s1" not in [x["study_id"] for x in sim["hits"]]
        txt = (await c.post("/api/search/text", json={"text": "left pleural effusion", "k": 3}, headers=h)).json()
        assert txt["mode"] == "text->report" and txt["hits"][0]["report"] == LEFT
        vec = [0.0] * (await c.get("/health")).json()["index"]["points"]
        r = await c.post("/api/search/vector", json={"vector": vec, "space": "image"}, headers=h)
        assert r.status_code == 400 and "takes" in r.json()["detail"]
        from retrieval.encoders import create_encoder

        v = create_encoder("pixels").encode_images([synthetic_cxr(4, left_blob=True)])[0].tolist()
        r = await c.post("/api/search/vector", json={"vector": v, "space": "image", "k": 2}, headers=h)
        assert r.status_code == 200 and r.json()["hits"][0]["study_id"] == "s4"
        case = (await c.get("/api/cases/s0", headers=h)).json()
        assert case["report"] == LEFT and case["images"] == ["/api/cases/s0/images/0"]
        assert {(e["anatomy"], e["finding"], e["status"]) for e in case["entities"]} >= {
            ("left lower lobe", "opacity", "present"), ("left pleura", "effusion", "present")}
        png = await c.get("/api/cases/ct1/images/0", headers=h)  # DICOM, windowed server-side
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        from PIL import Image

        im = Image.open(io.BytesIO(png.content))
        assert im.size == (128, 128) and im.getextrema()[1] > im.getextrema()[0]
        assert (await c.get("/api/cases/nope", headers=h)).status_code == 404
        assert (await c.get("/api/cases/s0/images/3", headers=h)).status_code == 404
        tax = (await c.get("/api/taxonomy", headers=h)).json()
        assert tax["conditioned"] == ["left lung", "heart"] and "effusion" in tax["findings"]


async def test_draft_endpoint_with_prior(index_dir, key_file):
    root, uri = index_dir
    async with _client(uri, key_file) as c:
        r = await c.post("/api/draft", files={"image": ("q.png", _png(synthetic_cxr(77, left_blob=True)), "image/png")},
                         data={"prior_report": NORMAL, "prior_study_id": "old1", "anatomy": "left lung", "k": "4"},
                         headers=_auth(key_file))
        assert r.status_code == 200, r.text
        d = r.json()
        assert d["generator"] == "structured" and "DRAFT" in d["disclaimer"] and len(d["cases_used"]) == 4
        assert d["status"] == "drafted" and d["reason"] is None
        assert any("effusion" in s["text"] for s in d["findings"])
        # the pixels encoder reads no findings: interval change is never claimed from analog cases
        assert d["comparison"] == []
        assert all(s["citations"] for s in d["findings"] + d["impression"])


BAD_UPLOADS = [
    (b"", 400, "empty upload"),
    (b"hello, this is not an image at all", 415, "not a PNG, JPEG or DICOM"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, 400, "corrupt image"),
    (b"\xff\xd8\xff\xe0" + os.urandom(64), 400, "corrupt image"),
    (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\x04\x00" + b"1.2" + b"\xff" * 30, 400, "image"),
]


@pytest.mark.parametrize("data, status, message", BAD_UPLOADS)
async def test_bad_uploads_get_clear_errors(index_dir, key_file, data, status, message):
    async with _client(index_dir[1], key_file) as c:
        r = await c.post("/api/search/image", files={"image": ("scan.png", data, "image/png")}, headers=_auth(key_file))
        assert r.status_code == status, r.text
        assert message in r.json()["detail"] and "scan.png" not in r.json()["detail"]


async def test_limits_and_bad_parameters(index_dir, key_file):
    from pydicom.data import get_testdata_file

    root, uri = index_dir
    png = (root / "img" / "s0.png").read_bytes()
    async with _client(uri, key_file, max_upload_pixels=50 * 50, max_upload_frames=4, max_body_bytes=200_000) as c:
        h = _auth(key_file)
        r = await c.post("/api/search/image", files={"image": ("a.png", png, "image/png")}, headers=h)
        assert r.status_code == 413 and "pixel limit" in r.json()["detail"]
        multi = Path(get_testdata_file("emri_small.dcm")).read_bytes()  # 10 frames
        r = await c.post("/api/search/image", files={"image": ("m.dcm", multi, "application/dicom")}, headers=h)
        assert r.status_code == 413 and "frame limit" in r.json()["detail"]
        r = await c.post("/api/search/image", files={"image": ("big.png", b"\x89PNG" + b"0" * 300_000, "image/png")},
                         headers=h)
        assert r.status_code == 413
    async with _client(uri, key_file) as c:
        files = {"image": ("a.png", png, "image/png")}
        r = await c.post("/api/search/image", files=files, data={"anatomy": "left lunq"}, headers=h)
        assert r.status_code == 400 and "Did you mean: left lung" in r.json()["detail"]
        r = await c.post("/api/search/image", files=files, data={"k": "1000"}, headers=h)
        assert r.status_code == 400 and "k: Expected `int` <= 100" in r.json()["detail"]  # schema-stated bound
        r = await c.post("/api/search/image", files=files, data={"finding": "effusion", "finding_by": "image"},
                         headers=h)  # pixels index: nothing reads findings from the image
        assert r.status_code == 400 and "reads findings from the image" in r.json()["detail"]
        r = await c.post("/api/search/image", files=files, data={"finding": "effusion", "finding_by": "eyes"},
                         headers=h)
        assert r.status_code == 400
        r = await c.post("/api/search/text", json={"text": "x", "bogus": 1}, headers=h)
        assert r.status_code == 400
        r = await c.post("/api/search/text", json={"text": "x", "target": "images"}, headers=h)
        assert r.status_code == 400 and "joint" in r.json()["detail"]


async def test_no_phi_in_logs(index_dir, key_file, caplog):
    root, uri = index_dir
    caplog.set_level(logging.DEBUG)
    async with _client(uri, key_file) as c:
        h = _auth(key_file)
        await c.get("/api/studies/s0/similar", headers=h, params={"k": 3})
        await c.post("/api/search/image", files={"image": ("Doe^Jane_1950.png", (root / "img" / "s0.png").read_bytes(),
                                                           "image/png")}, data={"exclude_patient": PATIENT}, headers=h)
        await c.post("/api/search/text", json={"text": "effusion", "exclude_patient": PATIENT}, headers=h)
        await c.get("/api/cases/s0", headers=h)
        await c.get("/api/cases/ct1/images/0", headers=h)
    text = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore")))
    assert "/api/cases/{study_id} -> 200" in text  # the access log names route templates
    for secret in (PATIENT, DATE, "Doe^Jane", "CompressedSamples", "left lower lobe", key_file[1]):
        assert secret not in text


async def test_unready_service_says_why(tmp_path, key_file):
    async with _client(f"faiss:{tmp_path}/missing", key_file) as c:
        h = (await c.get("/health")).json()
        assert h["status"] == "error" and not h["ready"] and "no published index" in h["detail"]
        assert (await c.get("/health/ready")).status_code == 503
        assert (await c.get("/api/taxonomy", headers=_auth(key_file))).status_code == 503


def test_app_refuses_to_start_without_keys(index_dir, tmp_path):
    with pytest.raises(ValueError, match="API key file is required"):
        create_app(Settings(index=index_dir[1]))
    with pytest.raises(ValueError, match="does not exist"):
        create_app(Settings(index=index_dir[1], api_keys_file=str(tmp_path / "none.json")))


async def test_anonymous_service_serves_data_routes_without_a_key(index_dir):
    """``--allow-anonymous`` (local development): no key file, and data routes answer without a key."""
    root, uri = index_dir
    async with AsyncTestClient(app=create_app(Settings(index=uri, allow_anonymous=True))) as c:
        tax = await c.get("/api/taxonomy")
        assert tax.status_code == 200 and tax.json()["conditioned"] == ["left lung", "heart"]
        case = await c.get("/api/cases/s0", headers={"Authorization": "Bearer mrk_wrong"})  # a key is not checked
        assert case.status_code == 200 and case.json()["report"] == LEFT
        r = await c.post("/api/search/image", data={"k": "3"},
                         files={"image": ("q.png", (root / "img" / "s4.png").read_bytes(), "image/png")})
        assert r.status_code == 200 and len(r.json()["hits"]) == 3
