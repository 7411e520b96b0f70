"""The HTTP contract: status codes match bodies, the OpenAPI schema states the real constraints and
error responses, and schemathesis finds no request the schema allows that the server mishandles."""

from __future__ import annotations

import io

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.keys import add_key
from api.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="module")
def key_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, add_key(path, "contract")


def _client(uri, key_file, **over):
    return AsyncTestClient(app=create_app(Settings(index=uri, api_keys_file=str(key_file[0]), **over)))


def _auth(key_file):
    return {"Authorization": f"Bearer {key_file[1]}"}


async def test_unknown_routes_and_methods_keep_their_status(small_index, key_file):
    """Litestar's NotFoundException is also a ValueError: it must not fall into the 400 handler."""
    async with _client(small_index[1], key_file) as c:
        r = await c.get("/no/such/route")
        assert r.status_code == 404 and r.json()["status_code"] == 404
        r = await c.get("/api/cases/s0/images/notanint", headers=_auth(key_file))
        assert r.status_code == 404 and r.json()["status_code"] == 404
        r = await c.delete("/api/search/vector", headers=_auth(key_file))
        assert r.status_code == 405 and r.json()["status_code"] == 405
        r = await c.get("/api/cases/nope", headers=_auth(key_file))  # our own NotFound
        assert r.status_code == 404 and r.json()["status_code"] == 404


async def test_upload_error_body_states_the_http_status(small_index, key_file):
    async with _client(small_index[1], key_file, max_upload_bytes=1000) as c:
        r = await c.post("/api/search/image", headers=_auth(key_file),
                         files={"image": ("q.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 2000, "image/png")})
        assert r.status_code == 413 and r.json()["status_code"] == 413
        r = await c.post("/api/search/image", headers=_auth(key_file),
                         files={"image": ("q.txt", b"hello, not an image", "text/plain")})
        assert r.status_code == 415 and r.json()["status_code"] == 415


async def test_deeply_nested_json_is_a_400(small_index, key_file):
    async with _client(small_index[1], key_file) as c:
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"vector": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"):
            r = await c.post("/api/search/vector", headers={**_auth(key_file), "Content-Type": "application/json"},
                             content=body)
            assert r.status_code == 400, r.text
            assert r.json()["status_code"] == 400


async def test_schema_states_the_constraints_the_server_enforces(small_index, key_file):
    async with _client(small_index[1], key_file) as c:
        schema = (await c.get("/schema/openapi.json")).json()
        comps = schema["components"]["schemas"]
        vec = next(v for k, v in comps.items() if k.endswith("VectorSearchIn"))
        assert vec["properties"]["vector"]["minItems"] == 1
        assert vec["properties"]["k"]["minimum"] == 1 and vec["properties"]["k"]["maximum"] == 100
        text = next(v for k, v in comps.items() if k.endswith("TextSearchIn"))
        assert text["properties"]["text"]["minLength"] == 1
        assert "pattern" in text["properties"]["text"]  # not only whitespace
        case = schema["paths"]["/api/cases/{study_id}"]["get"]["responses"]
        assert {"200", "401", "404"} <= set(case)
        upload = schema["paths"]["/api/search/image"]["post"]["responses"]
        assert {"200", "400", "401", "413", "415"} <= set(upload)
        metrics = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert list(metrics) == ["text/plain"]


async def test_k_above_the_served_maximum_is_a_clear_400(small_index, key_file):
    async with _client(small_index[1], key_file) as c:
        r = await c.post("/api/search/vector", headers=_auth(key_file), json={"vector": [0.1] * 4, "k": 101})
        assert r.status_code == 400 and r.json()["status_code"] == 400
        assert "<= 100" in str(r.json()["extra"]) and "'key': 'k'" in str(r.json()["extra"])
        r = await c.post("/api/search/text", headers=_auth(key_file), json={"text": "   "})
        assert r.status_code == 400 and "'key': 'text'" in str(r.json()["extra"])


def _png() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# Upload routes: whether the bytes are a decodable PNG/JPEG/DICOM of a usable size cannot be stated
# in OpenAPI (``format: binary``), so refusing random bytes with 400/413/415/422 is the contract.
ST_CONFIG = """
[[operations]]
include-path-regex = "^/api/(search/image|draft)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "413", "415", "422"]
"""


@pytest.mark.integration
@pytest.mark.slow
def test_schemathesis_finds_no_failure_against_the_served_api(small_index, tmp_path):
    """Every check schemathesis has, against a real ``medrag serve`` process, bounded examples."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from eval.load import create_key, start_server, stop_server

    st = shutil.which("st") or str(Path(sys.executable).parent / "st")
    if not Path(st).exists():
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    key = create_key(tmp_path / "keys.json", "schemathesis")
    (tmp_path / "st.toml").write_text(ST_CONFIG)
    proc, url = start_server(small_index[1], tmp_path / "keys.json")
    try:
        run = subprocess.run([st, "--config-file", str(tmp_path / "st.toml"), "run", f"{url}/schema/openapi.json",
                              "-H", f"Authorization: Bearer {key}", "-n", "12", "--seed", "1", "-c", "all",
                              "--phases", "examples,coverage,fuzzing", "--no-color"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        stop_server(proc)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert " passed" in out and "failure" not in out.split("Test cases:")[-1], out[-3000:]
