"""Series -> volume (retrieval/imaging/volume.py): the LIDC sub-volumes and hostile series built
with pydicom (shuffled instance numbers, duplicates, holes, uneven steps, gantry tilt, enhanced
multi-frame, declared 4096^3, wrong modality, mixed series)."""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from retrieval.imaging.images import ImageLoadError, ImageTooLarge
from retrieval.imaging.volume import (
    DEFAULT_GRID,
    CTGrid,
    VolumeError,
    axial_display,
    group_series,
    load_series,
    tower_input,
)
from tests.conftest import SHARED

LIDC = SHARED / "data" / "lidc_ct_small"
GRID = CTGrid(spacing=(4.0, 4.0, 3.0), shape_xy=(32, 32), max_z=32, z_multiple=4, max_gap_mm=10.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _uid(n: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.{n}"


def write_slice(path: Path, pixels: np.ndarray, position: tuple[float, float, float],
                orientation: tuple[float, ...] = AXIAL, instance: int = 1, series: int = 1,
                spacing: tuple[float, float] = (4.0, 4.0), modality: str = "CT", sop: int | None = None,
                image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"), position_known: bool = True) -> Path:
    """A CT image slice: stored = HU + 1024 (uint16), RescaleIntercept -1024."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(_uid(10_000 + (sop if sop is not None else instance) + 1000 * series))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(1), _uid(100 + series)
    ds.Modality, ds.ImageType, ds.InstanceNumber = modality, list(image_type), instance
    if position_known:
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    ds.PixelSpacing = [f"{spacing[0]:g}", f"{spacing[1]:g}"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = np.clip(pixels + 1024, 0, 65535).astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def axial_series(folder: Path, n: int = 10, step: float = 3.0, value: object = None, size: int = 32,
                 **kw: object) -> list[Path]:
    """n axial slices at z = k * step mm; ``value(k, z)`` gives each slice's HU image."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(n):
        z = k * step
        img = value(k, z) if callable(value) else np.full((size, size), 10.0 * z, np.float32)
        out.append(write_slice(folder / f"s{k:03d}.dcm", np.asarray(img, np.float32), (-64.0, -64.0, z),
                               instance=k + 1, **kw))  # type: ignore[arg-type]
    return out


def z_profile(vol: object) -> np.ndarray:
    hu, valid = vol.hu, vol.valid  # type: ignore[attr-defined]
    return np.array([hu[:, :, j][valid[:, :, j]].mean() if valid[:, :, j].any() else np.nan
                     for j in range(hu.shape[2])])


# ---- the LIDC sub-volumes --------------------------------------------------------------------
def _lidc_series() -> list[Path]:
    if not LIDC.is_dir():
        pytest.skip("shared LIDC sub-volumes not present")
    return sorted(p for p in LIDC.glob("LIDC-*/*/*") if p.is_dir())


def test_lidc_series_become_lung_volumes_on_the_tower_grid() -> None:
    series = _lidc_series()
    assert len(series) == 3
    for folder in series:
        vol = load_series(folder)
        assert vol.hu.shape[:2] == DEFAULT_GRID.shape_xy and vol.hu.shape[2] % 16 == 0
        assert vol.spacing == DEFAULT_GRID.spacing and vol.header["Modality"] == "CT"
        inside = vol.hu[vol.valid]
        assert inside.min() >= -1024.0  # padding (-2000, -3024) never leaks below air
        assert -900 < float(inside.mean()) < -300  # a chest: mostly lung and air, some soft tissue
        x = tower_input(vol)
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert float(x[~vol.valid].max(initial=0.0)) == 0.0  # air padding is 0 after the window


def test_lidc_truncated_slice_is_dropped_as_a_missing_one() -> None:
    folder = [s for s in _lidc_series() if "LIDC-IDRI-0003" in str(s)][0]
    vol = load_series(folder)  # its last file has 522112 of 524288 pixel bytes
    assert vol.info.corrupt_dropped == 1 and vol.info.slices == 10
    assert any("unreadable slice dropped" in n for n in vol.info.notes)


def test_lidc_axial_display_matches_the_stored_slice() -> None:
    """RAS + radiological display equals what a viewer shows of the stored axial slice (rows
    anterior -> posterior, columns patient right -> left), not a mirrored one."""
    import pydicom
    from PIL import Image

    folder = [s for s in _lidc_series() if "LIDC-IDRI-0001" in str(s)][0]
    vol = load_series(folder)
    files = sorted(folder.glob("*.dcm"), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                              .ImagePositionPatient[2]))
    raw = pydicom.dcmread(files[len(files) // 2])
    hu = np.maximum(raw.pixel_array * float(raw.RescaleSlope) + float(raw.RescaleIntercept), -1024)
    crop = int(round(224 * 1.5 / float(raw.PixelSpacing[0])))
    o = (512 - crop) // 2
    ref = np.asarray(Image.fromarray(hu[o:o + crop, o:o + crop].astype(np.float32)).resize((224, 224)))
    img = axial_display(vol.hu, vol.hu.shape[2] // 2)
    same = np.corrcoef(img.ravel(), ref.ravel())[0, 1]
    mirrored = np.corrcoef(img[:, ::-1].ravel(), ref.ravel())[0, 1]
    assert same > 0.98 and mirrored < 0.9


# ---- order, orientation ------------------------------------------------------------------------
def test_order_is_by_position_never_instance_number(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    numbers = rng.permutation(10) + 1
    for k in range(10):  # instance numbers shuffled against position, files named in another order
        write_slice(tmp_path / f"{numbers[k]:03d}.dcm", np.full((32, 32), 10.0 * 3 * k, np.float32),
                    (-64.0, -64.0, 3.0 * k), instance=int(numbers[k]))
    prof = z_profile(load_series(tmp_path, GRID))
    prof = prof[np.isfinite(prof)]
    assert len(prof) >= 9 and np.all(np.diff(prof) > 0)  # HU grows with z: superior is +z


def test_axes_are_ras(tmp_path: Path) -> None:
    """A marker on the patient's left (DICOM +x), anterior (DICOM -y) and superior (+z)."""
    def marked(k: int, z: float) -> np.ndarray:
        img = np.full((32, 32), -1000.0, np.float32)
        if k == 8:
            img[4, 28] = 1000.0  # row 4: anterior (small LPS y); column 28: the patient's left
        return img

    axial_series(tmp_path, n=10, value=marked)
    vol = load_series(tmp_path, GRID)
    x, y, z = np.unravel_index(int(np.argmax(vol.hu)), vol.hu.shape)
    assert x < 16 and y > 16 and z > vol.hu.shape[2] // 2  # left = low x, anterior = high y, superior = high z


def test_coronal_acquisition_lands_in_ras(tmp_path: Path) -> None:
    """Coronal slices (rows run toward the feet): same RAS result, z from the in-plane rows."""
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    for k in range(12):
        img = np.full((32, 32), -1000.0, np.float32)
        if k == 2:
            img[3, 5] = 1000.0  # row 3 = near the top (superior); column 5 = patient's right
        write_slice(tmp_path / f"c{k}.dcm", img, (-64.0, -40.0 + 3.0 * k, 60.0), coronal, instance=k + 1)
    vol = load_series(tmp_path, GRID)
    x, y, z = np.unravel_index(int(np.argmax(vol.hu)), vol.hu.shape)
    assert x > 16 and z > 16  # right = high x, superior = high z


# ---- hostile geometry ----------------------------------------------------------------------------
def test_duplicate_slices_are_dropped(tmp_path: Path) -> None:
    axial_series(tmp_path, n=8)
    write_slice(tmp_path / "dup.dcm", np.full((32, 32), 999.0, np.float32), (-64.0, -64.0, 9.0), instance=99, sop=500)
    vol = load_series(tmp_path, GRID)
    assert vol.info.duplicates_dropped == 1 and vol.info.slices == 8
    assert float(vol.hu[vol.valid].max()) < 999.0  # the first by instance number was kept


def test_missing_slice_is_interpolated_and_a_hole_refused(tmp_path: Path) -> None:
    files = axial_series(tmp_path / "a", n=10)
    files[5].unlink()  # one 6 mm gap
    vol = load_series(tmp_path / "a", GRID)
    assert vol.info.gaps_filled == 1
    prof = z_profile(vol)
    prof = prof[np.isfinite(prof)]
    assert np.all(np.diff(prof) > 0)  # linear in z across the hole
    files = axial_series(tmp_path / "b", n=10)
    for f in files[3:8]:
        f.unlink()  # an 18 mm hole: slices missing, refused
    with pytest.raises(VolumeError, match="slices are missing"):
        load_series(tmp_path / "b", GRID)


def test_uneven_spacing_is_resampled_on_real_positions(tmp_path: Path) -> None:
    zs = [0.0, 2.0, 3.0, 7.0, 9.0, 12.0, 13.0, 17.0, 21.0, 24.0]
    for k, z in enumerate(zs):  # HU = 10 * z mm: a linear ramp in the patient, whatever the steps
        write_slice(tmp_path / f"u{k}.dcm", np.full((32, 32), 10.0 * z, np.float32), (-64.0, -64.0, z), instance=k + 1)
    vol = load_series(tmp_path, GRID)
    assert vol.info.uneven
    prof = z_profile(vol)
    ok = np.isfinite(prof)
    slopes = np.diff(prof[ok])[1:-1]  # the end voxels reach half a step past the end slices (held constant)
    assert len(slopes) >= 6
    assert np.allclose(slopes, 10.0 * GRID.spacing[2], atol=0.5)  # even steps of 30 HU (3 mm x 10 HU/mm)


def test_gantry_tilt_is_corrected(tmp_path: Path) -> None:
    """Positions sheared along y by tan(15 deg) per mm of z; a rod fixed in the patient (world
    x, y) must stand straight in the volume."""
    tilt = np.tan(np.radians(15.0))
    rod_x, rod_y = -12.0, 4.0  # mm, LPS
    for k in range(12):
        z = 3.0 * k
        origin = (-64.0, -64.0 + tilt * z, z)
        img = np.full((32, 32), -1000.0, np.float32)
        row, col = int(round((rod_y - origin[1]) / 4.0)), int(round((rod_x - origin[0]) / 4.0))
        img[row, col] = 1000.0
        write_slice(tmp_path / f"t{k}.dcm", img, origin, instance=k + 1)
    vol = load_series(tmp_path, GRID)
    assert 14.0 < vol.info.tilt_deg < 16.0
    peaks = [np.unravel_index(int(np.argmax(vol.hu[:, :, j])), vol.hu.shape[:2])
             for j in range(vol.hu.shape[2]) if vol.valid[:, :, j].any() and vol.hu[:, :, j].max() > 0]
    assert len(peaks) >= 8
    ys = np.array([p[1] for p in peaks])
    assert ys.max() - ys.min() <= 1  # a shear left in would drift 0.27 voxel per mm: ~9 voxels here


def test_steep_tilt_and_oblique_are_refused(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    for k in range(5):  # sheared by 2 mm per mm of z: 63 degrees
        write_slice(tmp_path / "t" / f"{k}.dcm", np.zeros((32, 32), np.float32),
                    (-64.0, -64.0 + 2.0 * 3.0 * k, 3.0 * k), instance=k + 1)
    with pytest.raises(VolumeError, match="gantry tilt"):
        load_series(tmp_path / "t", GRID)
    c, s = np.cos(np.radians(40)), np.sin(np.radians(40))
    (tmp_path / "o").mkdir()
    for k in range(5):
        write_slice(tmp_path / "o" / f"{k}.dcm", np.zeros((32, 32), np.float32), (0.0, -3.0 * k * s, 3.0 * k * c),
                    (1.0, 0.0, 0.0, 0.0, c, s), instance=k + 1)
    with pytest.raises(VolumeError, match="oblique"):
        load_series(tmp_path / "o", GRID)


# ---- multi-frame -------------------------------------------------------------------------------
def _enhanced(path: Path, frames: int, rows: int, with_positions: bool = True, pixel_bytes: bytes | None = None) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import UID, EnhancedCTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(_uid(9))
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = EnhancedCTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = _uid(1), _uid(300), "CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Rows = ds.Columns = rows
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0

    def item(**seqs: Dataset) -> Dataset:
        d = Dataset()
        for k, v in seqs.items():
            setattr(d, k, Sequence([v]))
        return d

    orient, measures, rescale = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = list(AXIAL)
    measures.PixelSpacing, measures.SliceThickness = [4.0, 4.0], 3.0
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    ds.SharedFunctionalGroupsSequence = Sequence([item(PlaneOrientationSequence=orient, PixelMeasuresSequence=measures,
                                                       PixelValueTransformationSequence=rescale)])
    if with_positions:
        per = []
        for k in range(frames):
            p = Dataset()
            p.ImagePositionPatient = [-64.0, -64.0, 3.0 * k]
            per.append(item(PlanePositionSequence=p))
        ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    if pixel_bytes is None:
        stack = np.stack([np.full((rows, rows), 10.0 * 3 * k, np.float32) for k in range(frames)])
        pixel_bytes = (stack + 1024).astype("<u2").tobytes()
    ds.PixelData = pixel_bytes
    ds.save_as(path, enforce_file_format=True)
    return path


def test_enhanced_multiframe_equals_the_single_frame_series(tmp_path: Path) -> None:
    mf = load_series(_enhanced(tmp_path / "mf.dcm", 10, 32), GRID)
    axial_series(tmp_path / "sf", n=10)
    sf = load_series(tmp_path / "sf", GRID)
    assert mf.info.multiframe and mf.info.slices == 10
    np.testing.assert_allclose(mf.hu, sf.hu, atol=1e-3)


def test_multiframe_without_positions_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="no per-frame plane positions"):
        load_series(_enhanced(tmp_path / "mf.dcm", 6, 32, with_positions=False), GRID)


# ---- the decode budget ---------------------------------------------------------------------------
def test_declared_4096_cubed_is_refused_before_allocation(tmp_path: Path) -> None:
    bomb = _enhanced(tmp_path / "bomb.dcm", 4096, 4096, with_positions=False, pixel_bytes=b"\0\0" * 8)
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="exceeds|exceed|limit"):
        load_series(bomb)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 32 * 1024 * 1024 and time.perf_counter() - t0 < 5.0


def test_series_over_the_volume_budget_is_refused_from_headers(tmp_path: Path) -> None:
    """17 slices each declaring 4096^2 (285 M voxels) with 8 bytes of pixel data: refused from
    headers before any slice is decoded (a decode would fail on the short data instead)."""
    from pydicom import dcmread

    files = axial_series(tmp_path, n=17, size=4)
    for f in files:
        ds = dcmread(f)
        ds.Rows = ds.Columns = 4096
        ds.save_as(f)
    with pytest.raises(ImageTooLarge, match="CT volume"):
        load_series(tmp_path)
    assert isinstance(ImageTooLarge("x"), ImageLoadError)  # a build skips it, the API answers 413


# ---- what is not one CT series ------------------------------------------------------------------
def test_not_ct_and_no_position_and_mixed_series_are_refused(tmp_path: Path) -> None:
    axial_series(tmp_path / "mr", n=4, modality="MR")
    with pytest.raises(VolumeError, match="modality MR is not CT"):
        load_series(tmp_path / "mr", GRID)
    axial_series(tmp_path / "nopos", n=4, position_known=False)
    with pytest.raises(VolumeError, match="never ordered by InstanceNumber"):
        load_series(tmp_path / "nopos", GRID)
    axial_series(tmp_path / "two" / "a", n=4, series=1)
    axial_series(tmp_path / "two" / "b", n=3, series=2)
    with pytest.raises(VolumeError, match="2 series in one source"):
        load_series(tmp_path / "two", GRID)
    groups = group_series(tmp_path / "two")
    assert sorted(len(v) for v in groups.values()) == [3, 4]
    uid = next(k for k, v in groups.items() if len(v) == 4)
    assert load_series(tmp_path / "two", GRID, series_uid=uid).info.slices == 4


def test_localizer_dropped_and_mixed_sizes_refused(tmp_path: Path) -> None:
    axial_series(tmp_path / "a", n=5)
    write_slice(tmp_path / "a" / "scout.dcm", np.zeros((32, 32), np.float32), (-64.0, 0.0, 0.0),
                (1.0, 0.0, 0.0, 0.0, 0.0, -1.0), instance=50, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    assert load_series(tmp_path / "a", GRID).info.localizers_dropped == 1
    axial_series(tmp_path / "b", n=5)
    write_slice(tmp_path / "b" / "odd.dcm", np.zeros((16, 16), np.float32), (-64.0, -64.0, 30.0), instance=60)
    with pytest.raises(VolumeError, match="differ in size"):
        load_series(tmp_path / "b", GRID)
    with pytest.raises(VolumeError, match="at least 3"):
        load_series(axial_series(tmp_path / "c", n=2), GRID)
