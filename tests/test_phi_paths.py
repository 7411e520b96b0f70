"""Image paths never leave the build (issue 13): an export path naming the patient
(``export/MRN-8675300_Zzyzx_Quintavius0/img.dcm``) must not reach the published index, segment
payloads, ``medrag search`` output or API JSON; thumbnails still resolve through the private map.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.cli import main
from api.settings import Settings
from indexer.build import BuildConfig, build_index, private_dir_for, state_dir_for
from indexer.manifest import write_manifest
from indexer.phi import image_paths, image_ref, is_image_ref
from retrieval.records import Study

from .conftest import save_png, synthetic_cxr

SECRETS = ("MRN-8675300", "Zzyzx", "Quintavius")


@pytest.fixture(scope="module")
def phi_index(tmp_path_factory) -> tuple[Path, str]:
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("phi")
    folder = root / "export" / "MRN-8675300_Zzyzx_Quintavius0"
    folder.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "img.dcm")  # type: ignore[arg-type]
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")  # its skip message names the path
    studies = [Study(study_id="phi1", images=["export/MRN-8675300_Zzyzx_Quintavius0/img.dcm"],
                     report="No acute abnormality.", modality="CT"),
               Study(study_id="phi2", images=["export/MRN-8675300_Zzyzx_Quintavius0/broken.png"], modality="CR")]
    for i in range(3):
        save_png(root / "export" / f"s{i}.png", synthetic_cxr(i, left_blob=True))
        studies.append(Study(study_id=f"s{i}", images=[f"export/s{i}.png"], report="Small left effusion.",
                             modality="CR"))
    write_manifest(root / "m.jsonl", studies)
    uri = f"faiss:{root}/ix"
    rep = build_index(root / "m.jsonl", uri, BuildConfig(encoder="pixels", text_encoder=None, conditioning=()),
                      progress=False)
    # the admin's build report still names the file it skipped (segments store only its reference)
    assert any("MRN-8675300_Zzyzx_Quintavius0/broken.png" in m for m in rep.skipped), rep.skipped
    return root, uri


def _texts_under(folder: Path, skip: Path | None = None) -> str:
    """Every byte of every file under ``folder`` (but ``skip``), zip/npz members inflated."""
    out = []
    for p in folder.rglob("*"):
        if not p.is_file() or (skip is not None and skip in p.parents):
            continue
        data = p.read_bytes()
        out.append(data.decode("latin-1"))
        if p.suffix == ".npz":  # strings are stored as UTF-32 arrays: decode them
            import numpy as np

            with np.load(p, allow_pickle=False) as z:
                out.extend(str(z[k]) for k in z.files)
        if zipfile.is_zipfile(io.BytesIO(data)):
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                out.extend(z.read(n).decode("latin-1") for n in z.namelist())
    return "\n".join(out)


def _clean(text: str) -> None:
    for s in SECRETS:
        assert s not in text


def test_published_index_and_segments_hold_no_path(phi_index):
    root, uri = phi_index
    state = state_dir_for(uri)  # ix/.build: segments and the lock, inside the index folder
    published = _texts_under(root / "ix", skip=state)
    assert "phi1" in published  # the scan does see the payloads
    _clean(published)
    segments = _texts_under(state / "segments")
    assert "phi1" in segments
    _clean(segments)
    # issue 23: nothing under the index folder names the export path, the build state included
    everything = _texts_under(root / "ix")
    _clean(everything)
    assert not (state / "published.jsonl").exists() and not (state / "pending.jsonl").exists()


def test_source_paths_live_in_a_private_folder_outside_the_index(phi_index):
    import stat

    root, uri = phi_index
    private = private_dir_for(uri)
    assert (root / "ix").resolve() not in private.parents
    for d in (private, private.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, oct(d.stat().st_mode)
    held = (private / "published.jsonl").read_text()
    assert "MRN-8675300_Zzyzx_Quintavius0" in held  # the rebuild record keeps the real path, privately
    assert json.loads((private / "source.json").read_text())["uri"] == uri
    from indexer.verify import verify_index

    assert verify_index(uri).identifying == []  # a skip message by reference is not a finding


def test_payload_image_is_an_opaque_reference_resolved_privately(phi_index):
    root, uri = phi_index
    from retrieval.index import SearchFilter, open_index
    from retrieval.records import Payload

    ix = open_index(uri)
    pts = ix.find(SearchFilter(study_ids=["phi1"]), limit=4)
    ref = Payload.of(pts[0].payload).image
    assert ref is not None and is_image_ref(ref)
    real = str((root / "export" / "MRN-8675300_Zzyzx_Quintavius0" / "img.dcm").resolve())
    assert ref == image_ref(real)
    assert image_paths(private_dir_for(uri))[ref] == real  # the map stays in the private state
    assert image_paths(state_dir_for(uri)) == {}  # and not beside the index


def test_search_cli_output_holds_no_path(phi_index, capsys):
    root, uri = phi_index
    for extra in ([], ["--json"]):
        assert main(["search", "--index", uri, "--image", str(root / "export" / "s0.png"), "-k", "4", *extra]) == 0
        out = capsys.readouterr().out
        assert "phi1" in out
        _clean(out)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_api_json_holds_no_path_and_thumbnail_still_works(phi_index):
    root, uri = phi_index
    async with AsyncTestClient(app=create_app(Settings(index=uri, allow_anonymous=True,
                                                       load_text_encoder=False))) as c:
        png = (root / "export" / "s0.png").read_bytes()
        r = await c.post("/api/search/image", files={"image": ("s0.png", png, "image/png")}, data={"k": "4"})
        assert r.status_code == 200, r.text
        assert "phi1" in r.text
        _clean(r.text)
        case = await c.get("/api/cases/phi1")
        assert case.status_code == 200
        _clean(case.text)
        health = await c.get("/health")
        _clean(health.text)
        thumb = await c.get("/api/cases/phi1/images/0")
        assert thumb.status_code == 200 and thumb.content.startswith(b"\x89PNG")
        json.loads(case.text)
