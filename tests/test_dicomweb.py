"""PACS source against a real Orthanc with its DICOMweb plugin (Debian ``orthanc``, ``orthanc-dicomweb``)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from indexer.build import BuildConfig, build_index
from indexer.manifest import write_manifest
from indexer.sources.dicomweb import DicomWebClient, DicomWebError, from_dicomweb, valid_uid
from retrieval.index import open_index
from retrieval.search import Query, Searcher

from .conftest import pydicom_data_dir

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGINS = "/usr/share/orthanc/plugins"
FILES = ["RG1_UNCR.dcm", "MR2_UNCR.dcm", "US1_UNCR.dcm", "CT_small.dcm"]

pytestmark = pytest.mark.integration  # a real Orthanc process


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_orthanc(root: Path, users: dict[str, str] | None = None):
    """Run Orthanc with DICOMweb on a free port; ``users`` turns HTTP basic auth on."""
    if os.environ.get("MEDRAG_SKIP_ORTHANC") == "1":
        pytest.skip("MEDRAG_SKIP_ORTHANC=1")
    if not Path(ORTHANC).exists() or not Path(PLUGINS, "libOrthancDicomWeb.so").exists():
        pytest.fail("the PACS test needs Debian's orthanc and orthanc-dicomweb "
                    "(apt-get install orthanc orthanc-dicomweb; make test does this), or MEDRAG_SKIP_ORTHANC=1")
    port = _port()
    cfg = {"Name": "medrag-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
           "HttpPort": port, "DicomServerEnabled": False, "RemoteAccessAllowed": False,
           "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
           "Plugins": [PLUGINS], "StableAge": 1, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    (root / "config.json").write_text(json.dumps(cfg))
    log = open(root / "orthanc.log", "w")  # noqa: SIM115 (closed at teardown)
    proc = subprocess.Popen([ORTHANC, str(root / "config.json")], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    auth = next(iter(users.items())) if users else None
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/system", timeout=1, auth=auth).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    yield from _start_orthanc(tmp_path_factory.mktemp("orthanc"))


PACS_USER = ("medrag", "s3cret-pass")


@pytest.fixture(scope="module")
def orthanc_auth(tmp_path_factory):
    """An Orthanc that answers only with basic auth (REST API, change log and DICOMweb alike)."""
    yield from _start_orthanc(tmp_path_factory.mktemp("orthanc-auth"), users=dict([PACS_USER]))


def _upload(url: str, path: Path, auth: tuple[str, str] | None = None) -> None:
    r = httpx.post(url + "/instances", content=path.read_bytes(), timeout=30, auth=auth)
    assert r.status_code == 200, r.text


def _wait_stable(url: str, studies: int, auth: tuple[str, str] | None = None) -> None:
    """Orthanc marks a study stable StableAge (1 s here) after its last instance."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        changes = httpx.get(url + "/changes", params={"since": 0, "limit": 10000}, auth=auth).json()["Changes"]
        if sum(1 for c in changes if c["ChangeType"] == "StableStudy") >= studies:
            return
        time.sleep(0.3)
    pytest.fail("Orthanc did not report the studies stable")


def _data(name: str) -> Path:
    from pydicom.data import get_testdata_file

    p = pydicom_data_dir() / name
    return p if p.exists() else Path(get_testdata_file(name))


def test_index_a_pacs_incrementally_and_search(orthanc, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDRAG_PHI_KEY", "pacs-test")
    for name in FILES[:3]:
        _upload(orthanc, _data(name))
    _wait_stable(orthanc, 3)
    with DicomWebClient(orthanc + "/dicom-web") as client:
        assert len(client.studies()) == 3
    cache, manifest = tmp_path / "cache", tmp_path / "m.jsonl"
    first = from_dicomweb(orthanc + "/dicom-web", cache, manifest, orthanc_url=orthanc)
    assert first.fetched == 3 and len(first.studies) == 3, first.skipped
    write_manifest(manifest, first.studies)
    uri = f"qdrant+local:{tmp_path}/ix"
    rep = build_index(manifest, uri, BuildConfig(encoder="pixels", text_encoder=None, conditioning=("lung",)),
                      progress=False)
    assert rep.studies == 3
    # names on disk and ids in the manifest are keyed pseudonyms, never the PACS's UIDs
    text = manifest.read_text()
    import pydicom

    rg1 = pydicom.dcmread(_data("RG1_UNCR.dcm"), stop_before_pixels=True)
    assert rg1.StudyInstanceUID not in text and str(rg1.PatientName) not in text

    _upload(orthanc, _data(FILES[3]))  # a new study arrives
    _wait_stable(orthanc, 4)
    second = from_dicomweb(orthanc + "/dicom-web", cache, manifest, orthanc_url=orthanc)
    assert second.fetched == 1 and len(second.studies) == 4
    write_manifest(manifest, second.studies)
    rep2 = build_index(manifest, uri, BuildConfig(encoder="pixels", text_encoder=None, conditioning=("lung",)),
                       progress=False)
    assert rep2.studies == 4 and rep2.reused == 3  # only the new study was encoded
    third = from_dicomweb(orthanc + "/dicom-web", cache, manifest, orthanc_url=orthanc)
    assert third.fetched == 0 and len(third.studies) == 4  # nothing new in the change log

    ix = open_index(uri)
    from retrieval.imaging.images import load_image, pixel_key
    from retrieval.index import SearchFilter
    from retrieval.records import Payload

    cr = next(s for s in second.studies if s.modality == "CR")
    query = load_image(manifest.parent / cr.images[0])
    stored = [Payload.of(p.payload) for p in ix.find(SearchFilter(study_ids=[cr.study_id]))]
    assert [p.image_key for p in stored] == [pixel_key(query)]  # the fetched pixels are indexed...
    res = Searcher(ix, __import__("retrieval.encoders", fromlist=["x"]).create_encoder("pixels")).by_image(
        [query], Query(k=3))
    # ...but a query never finds its own image: the other three studies come back
    assert len(res.hits) == 3 and cr.study_id not in {h.study_id for h in res.hits}
    ix.close()


def test_dicomweb_by_date_and_hostile_answers(orthanc, tmp_path):
    res = from_dicomweb(orthanc + "/dicom-web", tmp_path / "c", tmp_path / "m.jsonl", since="2000-01-01")
    assert res.fetched >= 1 and len(res.studies) == res.fetched
    again = from_dicomweb(orthanc + "/dicom-web", tmp_path / "c", tmp_path / "m.jsonl", since="2000-01-01")
    assert again.fetched == 0 and len(again.studies) == len(res.studies)
    for bad in ("../../etc/passwd", "1.2.3/../4", "1.2.a", "", "1." * 40):
        assert not valid_uid(bad)
    assert valid_uid("1.2.840.10008.5.1.4.1.1.2")
    with DicomWebClient(orthanc + "/nope") as c, pytest.raises(DicomWebError, match="HTTP 404"):
        c.studies()
    with DicomWebClient("http://127.0.0.1:9/dicom-web") as c, pytest.raises(DicomWebError, match="ConnectionError"):
        c.studies()


def test_a_pacs_behind_basic_auth_syncs_through_the_change_log(orthanc_auth, tmp_path, monkeypatch):
    """Regression: the Orthanc ``/changes`` client used to drop the credentials (HTTP 401)."""
    monkeypatch.setenv("MEDRAG_PHI_KEY", "pacs-test")
    _upload(orthanc_auth, _data(FILES[0]), auth=PACS_USER)
    _wait_stable(orthanc_auth, 1, auth=PACS_USER)
    cache, manifest = tmp_path / "cache", tmp_path / "m.jsonl"
    with pytest.raises(DicomWebError, match="changes: HTTP 401"):
        from_dicomweb(orthanc_auth + "/dicom-web", cache, manifest, orthanc_url=orthanc_auth)
    with pytest.raises(DicomWebError, match="HTTP 401"):
        from_dicomweb(orthanc_auth + "/dicom-web", cache, manifest, orthanc_url=orthanc_auth,
                      auth=(PACS_USER[0], "wrong"))
    res = from_dicomweb(orthanc_auth + "/dicom-web", cache, manifest, orthanc_url=orthanc_auth, auth=PACS_USER)
    assert res.fetched == 1 and len(res.studies) == 1, res.skipped
    assert not res.skipped
    cached = list((cache).glob("*/*.dcm"))
    assert len(cached) == 1
    import pydicom

    got, sent = pydicom.dcmread(cached[0]), pydicom.dcmread(_data(FILES[0]))
    # the cache holds the stored object: same instance, transfer syntax and pixel bytes
    assert got.SOPInstanceUID == sent.SOPInstanceUID and got.PixelData == sent.PixelData
    assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    again = from_dicomweb(orthanc_auth + "/dicom-web", cache, manifest, orthanc_url=orthanc_auth, auth=PACS_USER)
    assert again.fetched == 0 and len(again.studies) == 1
