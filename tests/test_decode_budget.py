"""The shared decode budget (issue 13): bombs are refused from the codestream and the inflated
size before allocation, decodes share one memory pool, and special files are never read.

RSS is measured in a fresh subprocess (``resource.getrusage`` peak minus the peak just before the
call), so the figures are the decode's own and not the test runner's.
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import anyio
import pytest

from api.settings import Settings
from api.uploads import UploadError, decode
from retrieval.imaging import budget
from retrieval.imaging.dicom import DicomDecodeError, read_header
from retrieval.imaging.images import ImageLoadError, ImageTooLarge, load_image

ROOT = Path(__file__).resolve().parents[1]
# peak resident memory of the child itself: ru_maxrss survives exec (a child of a 2 GB pytest
# starts at 2 GB), the kernel's VmHWM belongs to the new address space
HWM = """
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1])
    raise RuntimeError('no VmHWM')
"""
MB = 1024 * 1024


def _j2k_bomb(side: int = 20000) -> bytes:
    """pydicom-data's US1_J2KR.dcm (154 KB, 640x480) with its SIZ marker declaring side x side."""
    from pydicom.data import get_testdata_file

    data = bytearray(Path(get_testdata_file("US1_J2KR.dcm")).read_bytes())  # type: ignore[arg-type]
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0
    struct.pack_into(">IIIIII", data, at + 8, side, side, 0, 0, side, side)  # Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz
    return bytes(data)


def _deflate_bomb(zero_bytes: int = 1024 * MB) -> bytes:
    """A deflated explicit-VR DICOM (64x64 image) carrying a ``zero_bytes`` OB element of zeros."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import (
        DeflatedExplicitVRLittleEndian,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)

    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"OW", b"UN"):
            return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", group, elem, vr, len(value)) + value

    head = b"".join([
        el(0x0028, 0x0002, b"US", struct.pack("<H", 1)), el(0x0028, 0x0004, b"CS", b"MONOCHROME2 "),
        el(0x0028, 0x0010, b"US", struct.pack("<H", 64)), el(0x0028, 0x0011, b"US", struct.pack("<H", 64)),
        el(0x0028, 0x0100, b"US", struct.pack("<H", 8)), el(0x0028, 0x0101, b"US", struct.pack("<H", 8)),
        el(0x0028, 0x0102, b"US", struct.pack("<H", 7)), el(0x0028, 0x0103, b"US", struct.pack("<H", 0)),
        struct.pack("<HH2sHI", 0x0042, 0x0011, b"OB", 0, zero_bytes),  # EncapsulatedDocument: zeros
    ])
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [comp.compress(head)]
    chunk = bytes(16 * MB)
    left = zero_bytes
    while left:
        parts.append(comp.compress(chunk[:min(left, len(chunk))]))
        left -= min(left, len(chunk))
    parts.append(comp.compress(el(0x7FE0, 0x0010, b"OB", bytes(range(256)) * 16)))
    parts.append(comp.flush())
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + b"".join(parts)


@pytest.fixture(scope="module")
def deflate_bomb() -> bytes:
    return _deflate_bomb()


def _settings(**kw: object) -> Settings:
    return Settings(index="x", **kw)  # type: ignore[arg-type]


# ---- declared sizes come from the codestream, not the header ------------------------------------------
def test_j2k_siz_is_read_from_encapsulated_pixel_data():
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(_j2k_bomb(20000)))
    assert (ds.Rows, ds.Columns) == (480, 640)  # the header still says 640x480
    d = budget.dicom_size(ds)
    assert (d.width, d.height, d.samples, d.bytes_per_sample) == (20000, 20000, 3, 1)


def test_j2k_bomb_is_refused_by_load_and_upload():
    bomb = _j2k_bomb()
    with pytest.raises(ImageTooLarge, match=r"bomb\.dcm: image 20000x20000 exceeds"):
        load_image(bomb, name="bomb.dcm")
    with pytest.raises(UploadError, match="20000x20000") as exc:
        anyio.run(decode, bomb, "image", _settings())
    assert exc.value.status == 413


def test_real_j2k_dicom_still_decodes():
    from pydicom.data import get_testdata_file

    img = load_image(Path(get_testdata_file("US1_J2KR.dcm")))  # type: ignore[arg-type]
    assert img.shape == (480, 640)


def test_jpeg_sof_and_png_ihdr_sizes():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, "JPEG")
    assert budget.raster_size(buf.getvalue()) == budget.Declared(300, 200, 1, 3, 1)
    buf = io.BytesIO()
    Image.new("I;16", (50, 40)).save(buf, "PNG")
    assert budget.raster_size(buf.getvalue()) == budget.Declared(50, 40, 1, 1, 2)


def test_deflate_bomb_is_refused_before_inflating_it_whole(deflate_bomb):
    assert len(deflate_bomb) < 2 * MB  # 1 GiB of zeros
    with pytest.raises(ImageTooLarge, match="bomb.dcm: deflated DICOM inflates past"):
        load_image(deflate_bomb, name="bomb.dcm")
    with pytest.raises(UploadError, match="inflates past") as exc:
        anyio.run(decode, deflate_bomb, "image", _settings())
    assert exc.value.status == 413


def test_deflate_bomb_on_disk_is_refused_by_header_reads(tmp_path, deflate_bomb):
    """``medrag index manifest dicom`` reads headers only; pydicom would still inflate it all."""
    p = tmp_path / "bomb.dcm"
    p.write_bytes(deflate_bomb)
    with pytest.raises(DicomDecodeError, match="inflates past"):
        read_header(p)


def test_small_deflated_dicom_still_decodes(tmp_path):
    data = _deflate_bomb(zero_bytes=1000)
    img = load_image(data, name="ok.dcm")
    assert img.shape == (64, 64)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["j2k", "deflate"])
def test_bombs_cost_under_200_mb(kind, tmp_path, deflate_bomb):
    path = tmp_path / "bomb.dcm"
    path.write_bytes(_j2k_bomb() if kind == "j2k" else deflate_bomb)
    code = HWM + f"""
import resource, json, anyio
from api.settings import Settings
from api.uploads import decode, UploadError
from retrieval.imaging.images import load_image, ImageTooLarge
data = open({str(path)!r}, 'rb').read()
import pydicom, PIL.Image, numpy  # imports are not the decode's cost
base = hwm()
out = {{}}
try:
    anyio.run(decode, data, 'image', Settings(index='x'))
except UploadError as e:
    out['status'] = e.status
try:
    load_image({str(path)!r})
except ImageTooLarge as e:
    out['build'] = str(e)
out['growth_kb'] = hwm() - base
print(json.dumps(out))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"{kind} bomb:", {k: v for k, v in out.items() if k != "build"})  # the figure (pytest -s)
    assert out["status"] == 413
    assert str(path) in out["build"]
    assert out["growth_kb"] < 200 * 1024, out


@pytest.mark.slow
def test_24_concurrent_large_jpeg_uploads_stay_under_2_gb(tmp_path):
    import numpy as np
    from PIL import Image

    side = 6300
    y, x = np.mgrid[0:side:8, 0:side:8]
    small = ((x + y) % 256).astype(np.uint8)
    img = Image.fromarray(small).resize((side, side)).convert("RGB")
    img.save(tmp_path / "big.jpg", "JPEG", quality=30)
    del img
    code = HWM + f"""
import resource, json, anyio
from api.settings import Settings
from api.uploads import decode
data = open({str(tmp_path / 'big.jpg')!r}, 'rb').read()
import PIL.Image, numpy
base = hwm()
shapes = []
async def one():
    shapes.append((await decode(data, 'image', Settings(index='x', decode_timeout_s=300))).shape)
async def main():
    async with anyio.create_task_group() as tg:
        for _ in range(24):
            tg.start_soon(one)
anyio.run(main)
peak = hwm()
print(json.dumps({{'n': len(shapes), 'shape': shapes[0], 'peak_kb': peak, 'growth_kb': peak - base}}))
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print("24 concurrent 6300x6300 JPEG uploads:", out)  # the figure for the README (pytest -s)
    assert out["n"] == 24 and out["shape"] == [side, side]
    assert out["peak_kb"] < 2 * 1024 * 1024, out


def test_pool_serialises_decodes_that_do_not_fit_together():
    pool = budget._Pool(100)
    d = budget.Declared(2, 2)  # 4 px * (1 + 16) = 68 bytes of work
    held = pool.acquire(d.work_bytes, "a", None)
    with pytest.raises(TimeoutError, match="b: waited"):
        pool.acquire(d.work_bytes, "b", 0.05)
    pool.release(held)
    assert pool.acquire(d.work_bytes, "b", 0.05) == 68
    with pytest.raises(budget.BudgetExceeded, match="c: decoding needs about 170"):
        pool.acquire(budget.Declared(10, 1).work_bytes, "c", None)


# ---- special files --------------------------------------------------------------------------------------
def _within(fn, seconds: float = 10.0):
    """Run ``fn`` in a daemon thread; fail (instead of hanging the suite) if it blocks."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "blocked on a special file"
    return box


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "img.dcm"
    os.mkfifo(fifo)
    box = _within(lambda: load_image(fifo, name="img.dcm"))
    assert isinstance(box.get("error"), ImageLoadError)
    assert str(box["error"]) == "img.dcm: not a regular file (FIFO); refused"
    box = _within(lambda: read_header(fifo))
    assert isinstance(box.get("error"), DicomDecodeError)
    assert "not a regular file (FIFO)" in str(box["error"])


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_dev_zero_is_refused():
    box = _within(lambda: load_image("/dev/zero"))
    assert isinstance(box.get("error"), ImageLoadError)
    assert str(box["error"]) == "/dev/zero: not a regular file (character device); refused"


def test_file_read_is_capped(tmp_path):
    p = tmp_path / "big.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(4096))
    with pytest.raises(ImageTooLarge, match="big.png: 4104 bytes exceeds the 1000-byte file limit"):
        load_image(p, name="big.png", budget=budget.DecodeBudget(max_file_bytes=1000))
