"""DICOM decoding on pydicom-data's real files and on DICOMs built here with pydicom."""

from pathlib import Path

import numpy as np
import pytest

from retrieval.imaging.dicom import DicomDecodeError, decode_dicom, read_header
from retrieval.imaging.images import ImageLoadError, load_image, sniff

from .conftest import pydicom_data_dir


def make_dicom(path: Path, arr: np.ndarray, photometric="MONOCHROME2", slope=1.0, intercept=0.0,
               window=None, frames=1) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "CR", "PAT-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = arr.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_monochrome1_is_inverted(tmp_path):
    ramp = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (20, 1))
    m2 = decode_dicom(make_dicom(tmp_path / "m2.dcm", ramp)).pixels
    m1 = decode_dicom(make_dicom(tmp_path / "m1.dcm", ramp, photometric="MONOCHROME1")).pixels
    assert m2[0, 0] < m2[0, -1] and m1[0, 0] > m1[0, -1]
    np.testing.assert_allclose(m1, 1 - m2, atol=1e-6)


def test_rescale_and_window_applied(tmp_path):
    arr = np.array([[0, 1000, 2000, 3000]] * 8, dtype=np.uint16)
    # HU = raw - 1000; window centre 40 width 400 -> [-160, 240]: -1000 black, 0 mid, >=1000 white
    img = decode_dicom(make_dicom(tmp_path / "ct.dcm", arr, intercept=-1000, window=(40, 400))).pixels
    assert img[0, 0] == pytest.approx(0.0, abs=1e-3)
    # HU 0 through the linear VOI function of PS3.3 C.11.2.1.2: (x - (c - 0.5)) / (w - 1) + 0.5
    assert img[0, 1] == pytest.approx((0 - (40 - 0.5)) / (400 - 1) + 0.5, abs=1e-4)  # 0.401
    assert img[0, 2] == pytest.approx(1.0, abs=1e-3) and img[0, 3] == pytest.approx(1.0, abs=1e-3)


def test_multiframe_takes_middle_frame(tmp_path):
    frames = np.stack([np.full((16, 16), v, np.uint16) for v in (0, 0, 0)])
    frames[1, :8] = 500  # only the middle frame has structure
    img = decode_dicom(make_dicom(tmp_path / "mf.dcm", frames, frames=3)).pixels
    assert img.shape == (16, 16) and img[:8].mean() > img[8:].mean()


def test_compressed_syntaxes_match_uncompressed():
    d = pydicom_data_dir()
    ref = load_image(d / "RG1_UNCR.dcm")  # CR chest, MONOCHROME1, 1955x1841
    assert ref.shape == (1955, 1841)
    j2k = load_image(d / "RG1_J2KR.dcm")  # JPEG 2000 lossless
    np.testing.assert_allclose(j2k, ref, atol=1e-3)
    rle = load_image(d / "emri_small_RLE.dcm")
    jls = load_image(d / "emri_small_jpeg_ls_lossless.dcm")
    np.testing.assert_allclose(rle, jls, atol=1e-6)


def test_header_only_read_keeps_grouping_fields():
    h = read_header(pydicom_data_dir() / "RG1_UNCR.dcm")
    assert h["Modality"] == "CR" and "StudyInstanceUID" in h and h["BodyPartExamined"] == "CHEST"


def test_corrupt_and_non_dicom_inputs_name_the_file(tmp_path):
    good = (pydicom_data_dir() / "MR_small.dcm") if (pydicom_data_dir() / "MR_small.dcm").exists() else pydicom_data_dir() / "emri_small.dcm"
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(good.read_bytes()[:600])
    with pytest.raises((DicomDecodeError, ImageLoadError), match="truncated.dcm"):
        load_image(bad)
    txt = tmp_path / "notes.dcm"
    txt.write_text("not an image")
    with pytest.raises(ImageLoadError, match="notes.dcm: not a PNG, JPEG or DICOM"):
        load_image(txt)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")


def test_format_is_sniffed_from_content_not_name(tmp_path):
    from PIL import Image

    p = tmp_path / "looks_like.dcm"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(p, format="PNG")
    assert sniff(p.read_bytes()[:132]) == "png"
    assert load_image(p).shape == (16, 16)
