"""Source adapters: R2Gen annotation (shared IU X-ray reports) and DICOM folders."""

import json
import shutil

import pytest

from indexer.manifest import ManifestError, read_manifest, write_manifest
from indexer.sources.dicom_folder import from_dicom_folder, pseudonym
from indexer.sources.r2gen import from_r2gen
from retrieval.records import Study

from .conftest import pydicom_data_dir, save_png, synthetic_cxr


def test_r2gen_with_images_root_and_report_only_mode(iu_annotation, tmp_path):
    ann = json.loads(iu_annotation.read_text())
    first = ann["val"][:3]
    for i, item in enumerate(first[:2]):  # images exist for two studies, as a user's copy would
        for name in item["image_path"]:
            save_png(tmp_path / "images" / name, synthetic_cxr(i))
    res = from_r2gen(iu_annotation, tmp_path / "images", tmp_path / "m.jsonl", splits=("val",))
    assert [s.study_id for s in res.studies] == [str(x["id"]) for x in first[:2]]
    assert all(s.images and s.report for s in res.studies)
    assert sum("not found" in s for s in res.skipped) >= len(ann["val"]) - 2
    only = from_r2gen(iu_annotation, None, tmp_path / "m2.jsonl", require_images=False)
    assert len(only.studies) == len(ann["train"]) + len(ann["val"]) and not only.skipped
    with pytest.raises(ValueError, match="images root"):
        from_r2gen(iu_annotation, None, tmp_path / "m3.jsonl")


def test_dicom_folder_groups_by_study_and_pseudonymises(tmp_path, monkeypatch):
    import numpy as np
    import pydicom

    from .test_dicom import make_dicom

    monkeypatch.setenv("MEDRAG_PHI_KEY", "test-key")
    src = pydicom_data_dir()
    for name in ("RG1_UNCR.dcm", "emri_small.dcm", "OT-PAL-8-face.dcm"):
        shutil.copy(src / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("hello")
    # one CT study: a 5-slice series (a volume) and a 2-image scout series
    ct = tmp_path / "ct"
    ct.mkdir()
    study, volume, scout = pydicom.uid.generate_uid(), pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for i in range(7):
        p = make_dicom(ct / f"{i}.dcm", np.full((8, 8), i, np.uint16))
        ds = pydicom.dcmread(p)
        ds.StudyInstanceUID, ds.Modality, ds.InstanceNumber = study, "CT", i + 1
        ds.SeriesInstanceUID = volume if i < 5 else scout
        ds.save_as(p)
    res = from_dicom_folder(tmp_path, tmp_path / "m.jsonl")
    assert len(res.studies) == 3
    assert any("notes.txt" in s for s in res.skipped) and any("OT-PAL-8-face" in s for s in res.skipped)
    ct_study = next(s for s in res.studies if s.modality == "CT")
    assert sorted(ct_study.images) == ["ct/2.dcm", "ct/5.dcm", "ct/6.dcm"]  # middle slice + scouts
    ds = pydicom.dcmread(src / "RG1_UNCR.dcm", stop_before_pixels=True)
    assert (ds.PatientID, ds.StudyDate) == ("9RG1", "20040826")
    cr = next(s for s in res.studies if s.modality == "CR")
    assert cr.study_id == pseudonym(ds.StudyInstanceUID, "study") and ds.StudyInstanceUID not in cr.study_id
    # expected values worked out by hand from the documented scheme (HMAC-SHA256 with the site key):
    # pseudonym = hex digest of "patient:9RG1", first 20 characters; the date moves by
    # int(first 4 bytes of the digest of "date-shift:9RG1") mod 731 - 365 = +338 days
    import hashlib
    import hmac

    assert cr.patient_id == hmac.new(b"test-key", b"patient:9RG1", hashlib.sha256).hexdigest()[:20]
    assert cr.patient_id == "0c1568dc66235a75ea48"  # pinned: a changed scheme breaks existing manifests
    digest = hmac.new(b"test-key", b"date-shift:9RG1", hashlib.sha256).digest()
    assert int.from_bytes(digest[:4], "big") % 731 - 365 == 338
    assert cr.study_date == "2005-07-30"  # 2004-08-26 + 338 days


def test_manifest_roundtrip_and_clear_errors(tmp_path):
    studies = [Study(study_id="a", images=["x.png"], report="No effusion.", study_date="2021-02-03")]
    assert write_manifest(tmp_path / "m.jsonl", studies) == 1
    assert list(read_manifest(tmp_path / "m.jsonl")) == studies
    (tmp_path / "bad.jsonl").write_text('{"study_id": "a"}\n{"study_id": "b", "study_date": "03/02/2021"}\n{oops\n')
    with pytest.raises(ManifestError, match="bad.jsonl:2: study_date"):
        list(read_manifest(tmp_path / "bad.jsonl"))
    errors: list[str] = []
    assert [s.study_id for s in read_manifest(tmp_path / "bad.jsonl", errors)] == ["a"]
    assert len(errors) == 2 and "bad.jsonl:3" in errors[1]
