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
