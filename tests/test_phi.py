"""The PHI guard: no Basic Profile attribute reaches the manifest, the index, the logs or the API."""

from __future__ import annotations

import datetime as dt
import logging
import shutil

import pydicom
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.keys import add_key
from api.settings import Settings
from indexer.build import BuildConfig, build_index
from indexer.manifest import write_manifest
from indexer.phi import BASIC_PROFILE, PhiPolicy, deidentify
from indexer.sources.dicom_folder import from_dicom_folder

PHI = {"PatientName": "Doe^Jane^Q", "PatientID": "MRN-778899", "PatientBirthDate": "19500214",
       "AccessionNumber": "ACC-55511", "InstitutionName": "St Elsewhere Hospital",
       "ReferringPhysicianName": "House^Gregory", "StudyDescription": "CHEST PA Jane Doe follow-up",
       "StudyID": "STUDY-9931", "PatientAddress": "12 Elm Street, Springfield", "StudyDate": "20190314",
       "OperatorsName": "Tech^Tom", "StationName": "XR-ROOM-7"}
SECRETS = [v for k, v in PHI.items() if k != "StudyDate"] + ["Doe", "2019-03-14", "20190314", "1950"]


@pytest.fixture(scope="module")
def phi_folder(tmp_path_factory):
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("phi")
    (root / "dcm").mkdir()
    uids = []
    for i, burned in enumerate((False, False, True)):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        for k, v in PHI.items():
            setattr(ds, k, v)
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyDate = f"2019031{4 + i}"
        if burned:
            ds.BurnedInAnnotation = "YES"
        ds.save_as(root / "dcm" / f"img{i}.dcm")
        uids.append(ds.StudyInstanceUID)
    with open(root / "reports.csv", "w") as fh:
        fh.write("AccessionNumber,report\nACC-55511,Small left pleural effusion. Heart size is normal.\n")
    return root, uids


def test_deidentify_is_an_allow_list():
    policy = PhiPolicy(b"k")
    header = {**PHI, "Modality": "CR", "StudyInstanceUID": "1.2.3", "ViewPosition": "PA"}
    safe = deidentify(header, policy)
    assert set(safe) <= {"PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate", "Modality", "ViewPosition"}
    assert safe["PatientID"] == policy.pseudonym("MRN-778899", "patient") != "MRN-778899"
    # expected values of the keyed scheme (HMAC-SHA256, key b"k"), pinned: a changed scheme would
    # silently re-key every existing manifest
    assert safe["PatientID"] == "37a87b88d513fd07a62c"
    assert policy.date_shift("MRN-778899") == -72 and safe["StudyDate"] == "2019-01-01"  # 2019-03-14 - 72 days
    assert PhiPolicy(b"other").pseudonym("MRN-778899", "patient") != safe["PatientID"]
    # the shift spans the documented +-365 days over many patients, and is not constant
    shifts = {policy.date_shift(f"p{i}") for i in range(2000)}
    assert min(shifts) >= -365 and max(shifts) <= 365 and min(shifts) < -300 and max(shifts) > 300
    assert {"PatientName", "PatientBirthDate", "InstitutionName", "AccessionNumber"} <= BASIC_PROFILE
    assert policy.shift_date("2019-02-30", "p") is None and policy.shift_date("20190230", "p") is None


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_no_phi_in_manifest_index_logs_or_api(phi_folder, tmp_path, monkeypatch, caplog):
    root, uids = phi_folder
    monkeypatch.setenv("MEDRAG_PHI_KEY", "site-secret")
    caplog.set_level(logging.DEBUG)
    res = from_dicom_folder(root / "dcm", root / "manifest.jsonl", root / "reports.csv")
    assert len(res.studies) == 2  # the burned-in image is skipped, with a reason
    assert any("BurnedInAnnotation=YES" in s for s in res.skipped)
    assert len(from_dicom_folder(root / "dcm", root / "m2.jsonl", allow_burned_in=True).studies) == 3
    write_manifest(root / "manifest.jsonl", res.studies)
    # two studies of one patient: the interval between them survives the date shift
    d = sorted(dt.date.fromisoformat(s.study_date) for s in res.studies)
    assert (d[1] - d[0]).days == 1 and res.studies[0].patient_id == res.studies[1].patient_id
    assert all(s.report for s in res.studies)  # the report joined by accession number
    uri = f"faiss:{tmp_path}/ix"
    build_index(root / "manifest.jsonl", uri, BuildConfig(encoder="pixels", text_encoder=None), progress=False)

    blobs = [(root / "manifest.jsonl").read_bytes()]
    blobs += [p.read_bytes() for p in (tmp_path / "ix").rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl")]
    keys = tmp_path / "keys.json"
    key = add_key(keys, "t")
    async with AsyncTestClient(app=create_app(Settings(index=uri, api_keys_file=str(keys)))) as c:
        h = {"Authorization": f"Bearer {key}"}
        sid = res.studies[0].study_id
        for r in (await c.get(f"/api/cases/{sid}", headers=h), await c.get(f"/api/studies/{sid}/similar", headers=h),
                  await c.post("/api/search/image", headers=h,
                               files={"image": ("Doe_Jane.dcm", (root / "dcm" / "img0.dcm").read_bytes(), "x")}),
                  await c.get("/health")):
            assert r.status_code == 200, r.text
            blobs.append(r.content)
    blobs.append("\n".join(r.getMessage() for r in caplog.records).encode())
    text = b"\n".join(blobs).decode("utf-8", "replace")
    for secret in SECRETS + uids:
        assert secret not in text, secret


def test_pseudonyms_are_stable_per_key(phi_folder, tmp_path, monkeypatch):
    root, _ = phi_folder
    shutil.copytree(root / "dcm", tmp_path / "dcm")
    monkeypatch.setenv("MEDRAG_PHI_KEY", "a")
    a1 = from_dicom_folder(tmp_path / "dcm", tmp_path / "m.jsonl").studies
    a2 = from_dicom_folder(tmp_path / "dcm", tmp_path / "m.jsonl").studies
    monkeypatch.setenv("MEDRAG_PHI_KEY", "b")
    b = from_dicom_folder(tmp_path / "dcm", tmp_path / "m.jsonl").studies
    assert [s.study_id for s in a1] == [s.study_id for s in a2]
    assert not {s.study_id for s in a1} & {s.study_id for s in b}
