"""Hostile input: mutated DICOM/PNG/JPEG bytes through ingestion and the upload path (bounded fuzz).

Every case must end in an image (finite float32 in [0, 1]) or in the module's own clear error,
within a deadline; never another exception, a hang, or a huge allocation. Hand-made cases
cover lying dimensions and path traversal.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.settings import Settings
from api.uploads import UploadError, check
from retrieval.imaging.images import ImageLoadError, load_image
from retrieval.imaging.paths import ImagePathError, manifest_image, resolve_image

from .conftest import pydicom_data_dir, synthetic_cxr

SEEDS = ["CT_small.dcm", "MR_small.dcm"]
DATA_SEEDS = ["emri_small_RLE.dcm", "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm",
              "OBXXXX1A_2frame.dcm", "SC_rgb.dcm", "liver.dcm"]


def _seeds() -> list[bytes]:
    from pydicom.data import get_testdata_file

    out = [Path(get_testdata_file(n)).read_bytes() for n in SEEDS]
    out += [(pydicom_data_dir() / n).read_bytes() for n in DATA_SEEDS]
    from PIL import Image

    for fmt in ("PNG", "JPEG"):
        buf = io.BytesIO()
        Image.fromarray((synthetic_cxr(1, size=48) * 255).astype(np.uint8)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


SEED_BYTES = _seeds()
SCALE = int(os.environ.get("MEDRAG_FUZZ_SCALE", "1"))  # e.g. 20 for a long local campaign


@st.composite
def mutated(draw) -> bytes:
    data = bytearray(draw(st.sampled_from(SEED_BYTES)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "header"]))
        if op == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif op == "truncate" and len(data) > 140:
            data = data[: draw(st.integers(132, len(data) - 1))]
        elif op == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "header" and len(data) > 400:  # hit the tags and lengths, where parsers break
            i = draw(st.integers(128, 400))
            data[i:i + 4] = draw(st.binary(min_size=4, max_size=4))
    return bytes(data)


def _ok_image(arr: np.ndarray) -> None:
    assert arr.dtype == np.float32 and arr.ndim == 2 and np.isfinite(arr).all()
    assert arr.min() >= 0.0 and arr.max() <= 1.0


def test_ingestion_survives_mutated_files():
    """Each case decodes or is refused clearly, and the campaign exercised both outcomes.

    The counts live in this test (not in a module global read by a later test), so the test
    means the same run alone, in its file or in the whole suite.
    """
    stats = {"cases": 0, "decoded": 0, "rejected": 0}

    @settings(max_examples=400 * SCALE, deadline=5000, suppress_health_check=[HealthCheck.too_slow],
              derandomize=SCALE == 1)
    @given(mutated())
    def one(data):
        stats["cases"] += 1
        try:
            arr = load_image(data, name="fuzz")
        except ImageLoadError as exc:
            stats["rejected"] += 1
            assert str(exc).startswith("fuzz")  # the message names the input
        else:
            stats["decoded"] += 1
            _ok_image(arr)

    one()
    # a fuzzer whose mutants all decode (or all fail) tests only one of the two paths
    assert stats["cases"] >= 400 and stats["decoded"] > 0 and stats["rejected"] > 0, stats


@settings(max_examples=200 * SCALE, deadline=5000, suppress_health_check=[HealthCheck.too_slow],
          derandomize=SCALE == 1)
@given(mutated())
def test_upload_checks_survive_mutated_files(data):
    s = Settings(index="x", max_upload_pixels=4_000_000, max_upload_frames=16)
    try:
        check(data, "image", s)
    except UploadError as exc:
        assert exc.status in (400, 413, 415) and str(exc).startswith("image")
        return
    try:
        _ok_image(load_image(data, name="image"))
    except ImageLoadError:
        pass


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
            + struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND")))


def test_lying_dimensions_are_refused_before_allocation(tmp_path):
    bomb = _png_header(60000, 60000)  # 3.6 gigapixels declared in 57 bytes
    with pytest.raises(ImageLoadError, match="exceeds"):
        load_image(bomb, name="bomb.png")
    with pytest.raises(UploadError) as exc:
        check(bomb, "image", Settings(index="x"))
    assert exc.value.status == 413
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 500  # pixel data stays 32 KB
    ds.save_as(tmp_path / "lie.dcm")
    data = (tmp_path / "lie.dcm").read_bytes()
    with pytest.raises(ImageLoadError, match="exceed the limit"):
        load_image(data, name="lie.dcm")
    with pytest.raises(UploadError, match="frame limit"):
        check(data, "image", Settings(index="x"))


@pytest.mark.parametrize("name", ["../../etc/passwd", "images/../../../secret.png", "a/../../b.png"])
def test_path_traversal_is_refused(tmp_path, name):
    (tmp_path / "root").mkdir()
    with pytest.raises(ImagePathError, match="leaves its root folder"):
        resolve_image(name, str(tmp_path / "root"))
    assert resolve_image("images/x.png", str(tmp_path / "root")) == tmp_path / "root" / "images" / "x.png"
    # a symlink inside the root that points outside it is refused too
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(ImagePathError):
        resolve_image("link/secret.png", str(tmp_path / "root"))
    # a manifest (written by the user) may point next door; payloads may not
    assert manifest_image(tmp_path / "root" / "m.jsonl", "../img.png") == tmp_path / "root" / ".." / "img.png"


def test_regression_rust_codec_panic_is_a_clear_error():
    """Found by the fuzzer: three flipped bytes in an RLE stream made pylibjpeg-rle's Rust code
    panic (pyo3 PanicException, a BaseException that ``except Exception`` let through)."""
    data = bytearray((pydicom_data_dir() / "emri_small_RLE.dcm").read_bytes())
    for offset, value in ((25842, 155), (31849, 139), (47655, 186)):
        data[offset] = value
    with pytest.raises(ImageLoadError, match="malformed DICOM"):
        load_image(bytes(data), name="rle.dcm")


def test_regression_lazy_header_error_is_a_clear_error():
    """Found by the fuzzer: a corrupted VR (``D\\x00`` instead of ``DA``) only fails when pydicom
    reads the value lazily, after ``dcmread`` returned; the header check let NotImplementedError out."""
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    at = data.find(b"\x08\x00\x20\x00DA")  # (0008,0020) StudyDate, explicit VR
    assert at > 0
    bad = data[:at + 4] + b"D\x00" + data[at + 6:]
    with pytest.raises(UploadError, match="unreadable DICOM|malformed DICOM"):
        check(bad, "image", Settings(index="x"))


def test_regression_pillow_syntaxerror_is_a_clear_error():
    """Found by the fuzzer: a PNG whose IDAT length is wrong makes Pillow raise SyntaxError
    ("broken PNG file"), which the loader did not expect."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((48, 48)) * 255).astype(np.uint8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    at = data.find(b"IDAT") - 4
    data[at:at + 4] = struct.pack(">I", 1)
    with pytest.raises(ImageLoadError, match="corrupt image"):
        load_image(bytes(data), name="broken.png")
    import anyio

    from api.uploads import decode

    with pytest.raises(UploadError, match="image: corrupt image") as exc:  # the upload path: a 400
        anyio.run(decode, bytes(data), "image", Settings(index="x"))
    assert exc.value.status == 400
