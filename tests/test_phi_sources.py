"""One de-identification policy for every source (issue 23): a CSV patient id is pseudonymised
with the DICOM path's keyed hash, every date of a patient moves by that patient's one offset
(metadata and report text alike), the index folder holds nothing identifying, and
``medrag index verify`` reports identifying text it finds.

Planted PHI: an MRN, a name after "Dr.", a lower-case "patient" cue, an institution, a phone
number and a patient-named export folder, in a tiny folder of synthetic PNGs.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import stat
import zipfile
from pathlib import Path

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.cli import main
from api.settings import Settings
from indexer.build import BuildConfig, build_index, private_dir_for, state_dir_for
from indexer.deid import shifted_marker
from indexer.manifest import read_manifest, write_manifest
from indexer.phi import PhiPolicy, deidentify
from indexer.sources import source
from indexer.verify import verify_index
from retrieval.records import Payload, Study

from .conftest import save_png, synthetic_cxr

KEY = "phi-sources-key"
MRN = "MRN-8675309"
FOLDER = "Quintavius_Zzyzx"  # a patient-named export folder
REPORT = ("Report for patient Jane Doe. Compared with the exam of 2019-01-10. Small left pleural effusion. "
          "Transferred from Springfield General Hospital. Dictated by Dr. Gregory House, pager 555-867-5309.")
SECRETS = (MRN, "2019-04-15", "2019-01-10", "Jane", "Doe", "Gregory", "House", "Springfield", "555-867-5309", FOLDER)


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("MEDRAG_PHI_KEY", KEY)
    return PhiPolicy(KEY.encode())


def _folder(root: Path) -> tuple[Path, Path]:
    images = root / "images"
    rows = []
    for i in range(4):
        sub = images / FOLDER if i == 0 else images
        save_png(sub / f"s{i}.png", synthetic_cxr(i, left_blob=i % 2 == 0, size=64))
        rows.append({"study_id": f"s{i}", "images": f"{FOLDER}/s0.png" if i == 0 else f"s{i}.png",
                     "patient_id": MRN if i < 2 else f"other-{i}", "study_date": "2019-04-15",
                     "report": REPORT if i == 0 else "No acute disease."})
    with open(root / "reports.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return images, root / "reports.csv"


def _days(iso: str) -> int:
    return dt.date.fromisoformat(iso).toordinal()


def test_csv_source_uses_the_dicom_pseudonym_and_one_offset_per_patient(tmp_path, key):
    images, reports = _folder(tmp_path)
    res = source("folder")(images, reports, tmp_path / "m.jsonl")
    write_manifest(tmp_path / "m.jsonl", res.studies)
    text = (tmp_path / "m.jsonl").read_text()
    for secret in SECRETS[:-1]:  # the manifest must name the image files: the folder is in it
        assert secret not in text, secret
    s0 = next(s for s in read_manifest(tmp_path / "m.jsonl") if s.study_id == "s0")
    # the same keyed hash as a DICOM header's PatientID
    assert s0.patient_id == deidentify({"PatientID": MRN}, key)["PatientID"] == key.pseudonym(MRN, "patient")
    assert s0.deidentified
    # metadata and text shifted by the same offset: reading both does not recover it
    assert s0.study_date == key.shift_date("20190415", MRN) != "2019-04-15"
    found = re.search(r"\[DATE (\d{4}-\d{2}-\d{2})\]", s0.report or "")
    assert found and found.group(0) == shifted_marker(key.shift_date("20190110", MRN) or "")
    assert _days(s0.study_date) - _days(found.group(1)) == _days("2019-04-15") - _days("2019-01-10")
    assert "[NAME]" in (s0.report or "") and "[INSTITUTION]" in (s0.report or "")
    # a second pass (the build's) leaves a marked study alone
    from indexer.deid import deidentify_study

    assert deidentify_study(s0, key) == s0


def _texts_under(folder: Path) -> str:
    """Every byte under ``folder``, zip/npz members inflated (strings in npz are UTF-32 arrays)."""
    import numpy as np

    out = []
    for p in folder.rglob("*"):
        if not p.is_file():
            continue
        data = p.read_bytes()
        out.append(data.decode("latin-1"))
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as z:
                out.extend(str(z[k]) for k in z.files)
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                out.extend(z.read(n).decode("latin-1") for n in z.namelist())
    return "\n".join(out)


@pytest.fixture
def raw_index(tmp_path, key):
    """An index built from a hand-written manifest with raw ids, dates and report PHI."""
    images, reports = _folder(tmp_path)
    with open(reports, newline="") as fh:
        rows = list(csv.DictReader(fh))
    studies = [Study(study_id=r["study_id"], images=[f"images/{r['images']}"], report=r["report"],
                     patient_id=r["patient_id"], study_date=r["study_date"], modality="CR") for r in rows]
    write_manifest(tmp_path / "m.jsonl", studies)
    uri = f"faiss:{tmp_path}/ix"
    build_index(tmp_path / "m.jsonl", uri, BuildConfig(encoder="pixels", text_encoder=None, conditioning=()),
                progress=False)
    return tmp_path, uri


def test_build_stores_nothing_identifying_in_the_index_folder(raw_index, key):
    root, uri = raw_index
    everything = _texts_under(root / "ix")
    assert "s0" in everything  # the scan sees payloads and segments
    for secret in SECRETS:
        assert secret not in everything, secret
    from retrieval.index import SearchFilter, open_index

    ix = open_index(uri)
    p = Payload.of(ix.find(SearchFilter(study_ids=["s0"]))[0].payload)
    ix.close()
    assert p.patient_id == key.pseudonym(MRN, "patient") and p.study_date == key.shift_date("20190415", MRN)
    # the rebuild record keeps the real paths, in a private 0700 folder outside the index
    private = private_dir_for(uri)
    assert (root / "ix").resolve() not in private.parents
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert FOLDER in (private / "published.jsonl").read_text()
    assert verify_index(uri).identifying == []


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_api_never_echoes_a_raw_patient_id(raw_index, key):
    root, uri = raw_index
    pseudonym = key.pseudonym(MRN, "patient")
    async with AsyncTestClient(app=create_app(Settings(index=uri, allow_anonymous=True,
                                                       load_text_encoder=False))) as c:
        r = await c.get("/api/studies/s0/similar", params={"other_patients": "true", "k": 4})
        assert r.status_code == 200, r.text
        assert r.json()["filter"]["exclude_patient_id"] == pseudonym
        assert "s1" not in [h["study_id"] for h in r.json()["hits"]]  # s1 is the same patient
        png = (root / "images" / "s2.png").read_bytes()
        up = await c.post("/api/search/image", files={"image": ("q.png", png, "image/png")},
                          data={"k": "4", "exclude_patient": MRN})  # a user types the real MRN
        assert up.status_code == 200, up.text
        assert up.json()["filter"]["exclude_patient_id"] == pseudonym
        assert not {"s0", "s1"} & {h["study_id"] for h in up.json()["hits"]}  # and it still excludes
        for resp in (r, up):
            for secret in SECRETS:
                assert secret not in resp.text, secret


def test_verify_reports_identifying_text_of_an_old_build_and_repair_removes_it(tmp_path, key, monkeypatch, capsys):
    """An index built before issue 23 (raw patient ids and dates in payloads, the build record with
    source paths inside the index folder) is reported; --repair rebuilds it de-identified."""
    import indexer.build as build

    images, reports = _folder(tmp_path)
    res = source("folder")(images, reports, tmp_path / "m.jsonl")
    raw = [msgspec.structs.replace(s, patient_id=MRN, study_date="2019-04-15", deidentified=False,
                                   report=REPORT if s.study_id == "s0" else s.report) for s in res.studies]
    write_manifest(tmp_path / "m.jsonl", raw)
    uri = f"faiss:{tmp_path}/ix"
    monkeypatch.setattr(build, "_deidentified", lambda s: s)  # the old build: nothing de-identified
    monkeypatch.setattr(build, "_hide_paths", lambda m, s, mf: m)  # and skip messages named the file
    (images / FOLDER / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    raw.append(Study(study_id="s9", images=[f"images/{FOLDER}/broken.png"], patient_id=MRN))
    write_manifest(tmp_path / "m.jsonl", raw)
    build_index(tmp_path / "m.jsonl", uri, BuildConfig(encoder="pixels", text_encoder=None, conditioning=()),
                progress=False)
    private = private_dir_for(uri)
    (state_dir_for(uri) / "published.jsonl").write_bytes((private / "published.jsonl").read_bytes())
    (private / "published.jsonl").unlink()  # where the old build kept it
    monkeypatch.undo()
    monkeypatch.setenv("MEDRAG_PHI_KEY", KEY)

    assert main(["index", "verify", "--index", uri]) == 1
    out = capsys.readouterr().out
    assert "IDENTIFYING TEXT" in out and "patient id is not a pseudonym" in out
    assert "published.jsonl" in out and "report: " in out and "name" in out
    assert "skip message: names a source path" in out
    for secret in SECRETS:
        assert secret not in out, secret  # reported by place and kind, never by its text

    rep = verify_index(uri, repair=True)
    assert rep.repaired and rep.new_version
    assert verify_index(uri).identifying == []
    assert not (state_dir_for(uri) / "published.jsonl").exists() and (private / "published.jsonl").is_file()
    for secret in SECRETS:
        assert secret not in _texts_under(tmp_path / "ix"), secret


def test_private_state_inside_the_index_folder_is_refused(tmp_path, monkeypatch):
    from indexer.manifest import ManifestError

    monkeypatch.setenv("MEDRAG_STATE", str(tmp_path / "ix" / "state"))
    with pytest.raises(ManifestError, match="inside the index folder"):
        private_dir_for(f"faiss:{tmp_path}/ix")
