"""Shared fixtures: tiny real data (shared IU X-ray reports, pydicom's files, generated images)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MEDRAG_SHARED", ROOT.parent / "shared"))
IU_ANNOTATION = SHARED / "data" / "iu_xray_reports" / "annotation.json"

# the shared small index (``small_index``): 16 generated chest images, even ones with a left-sided
# opacity and effusion, plus one CT; s0 and s1 belong to one patient
SMALL_PATIENT = "PAT-SECRET-0042"
SMALL_DATE = "2019-03-14"
SMALL_LEFT = "Patchy opacity in the left lower lobe. Small left pleural effusion. Heart size is normal."
SMALL_NORMAL = "The lungs are clear. No pleural effusion. Heart size is normal."


def pydicom_data_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(autouse=True, scope="session")
def _build_state_in_tmp(tmp_path_factory):
    """Builds against server URIs keep segments under $MEDRAG_STATE; never the user's ~/.cache in tests."""
    old = os.environ.get("MEDRAG_STATE")
    os.environ["MEDRAG_STATE"] = str(tmp_path_factory.mktemp("medrag-state"))
    yield
    if old is None:
        os.environ.pop("MEDRAG_STATE", None)
    else:
        os.environ["MEDRAG_STATE"] = old


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="pydicom")
        yield


@pytest.fixture
def iu_annotation() -> Path:
    if not IU_ANNOTATION.is_file():
        pytest.fail(f"shared IU X-ray reports missing at {IU_ANNOTATION} (set MEDRAG_SHARED)")
    return IU_ANNOTATION


def synthetic_cxr(seed: int, left_blob: bool = False, right_blob: bool = False, size: int = 96) -> np.ndarray:
    """A crude frontal-chest-like image: two dark lung fields, a bright heart, optional 'opacities'.

    Left/right are the patient's: the patient's left lung is on the image's right half.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = 0.75 + 0.05 * rng.standard_normal((size, size))
    for cx in (0.3, 0.7):
        img -= 0.45 * (((xx - cx) / 0.17) ** 2 + ((yy - 0.5) / 0.33) ** 2 < 1)
    img += 0.3 * (((xx - 0.56) / 0.14) ** 2 + ((yy - 0.66) / 0.12) ** 2 < 1)
    if right_blob:
        img += 0.4 * (((xx - 0.3) / 0.1) ** 2 + ((yy - 0.65) / 0.1) ** 2 < 1)
    if left_blob:
        img += 0.4 * (((xx - 0.7) / 0.1) ** 2 + ((yy - 0.65) / 0.1) ** 2 < 1)
    return np.clip(img, 0, 1).astype(np.float32)


def save_png(path: Path, arr: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8), mode="L").save(path)
    return path


@pytest.fixture(scope="session")
def small_index(tmp_path_factory) -> tuple[Path, str]:
    """(root, uri) of one small FAISS index built once per session and shared by the files that
    need an ordinary index to query (the API, the drafting CLI); read-only for its users.

    s0..s15: ``img/s{i}.png`` (``synthetic_cxr(i, left_blob=i % 2 == 0)``), report SMALL_LEFT for
    even i and SMALL_NORMAL for odd i, patient SMALL_PATIENT for s0 and s1 (``p{i}`` otherwise),
    date SMALL_DATE, CR; ct1: pydicom's CT_small.dcm, CT. Pixel encoder, MiniLM reports,
    conditioned on the left lung and the heart.
    """
    import shutil

    from pydicom.data import get_testdata_file

    from indexer.build import BuildConfig, build_index
    from indexer.manifest import write_manifest
    from retrieval.records import Study

    root = tmp_path_factory.mktemp("small-index")
    studies = []
    for i in range(16):
        left = i % 2 == 0
        save_png(root / "img" / f"s{i}.png", synthetic_cxr(i, left_blob=left))
        studies.append(Study(study_id=f"s{i}", images=[f"img/s{i}.png"], report=SMALL_LEFT if left else SMALL_NORMAL,
                             patient_id=SMALL_PATIENT if i < 2 else f"p{i}", study_date=SMALL_DATE, modality="CR"))
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "img" / "ct.dcm")
    studies.append(Study(study_id="ct1", images=["img/ct.dcm"], report="No acute abnormality.", modality="CT"))
    write_manifest(root / "m.jsonl", studies)
    uri = f"faiss:{root}/ix"
    build_index(root / "m.jsonl", uri, BuildConfig(encoder="pixels", conditioning=("left lung", "heart")),
                progress=False)
    return root, uri
