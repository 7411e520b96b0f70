"""Decode DICOM files into display-ready grayscale arrays, the way a reading workstation would.

Order of operations follows PS3.3 C.11: stored values -> Modality LUT (rescale slope/intercept
or LUT) -> VOI LUT (window centre/width or LUT) -> presentation (MONOCHROME1 is inverted so that
air is dark everywhere). Without a VOI in the header, a 0.5-99.5 percentile window stands in, so
one bright marker does not flatten the whole image. Multi-frame objects give their middle frame:
medrag retrieves 2D images, and the middle frame is the usual key image of a cine or a slab.
Compressed transfer syntaxes decode through pylibjpeg's plugins (JPEG 2000, JPEG-LS, RLE) or
Pillow (baseline JPEG); a missing plugin is named in the error.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.imaging import budget as _budget
from retrieval.imaging.budget import BudgetExceeded, DecodeBudget, as_int

MAX_PIXELS = 64_000_000  # rows * columns * frames refused above this (hostile or broken headers)


class DicomDecodeError(ValueError):
    """A DICOM file that cannot be turned into an image; the message names the file."""


@dataclass(frozen=True)
class DicomImage:
    pixels: np.ndarray  # float32 (H, W) in [0, 1], display orientation, MONOCHROME2 sense
    header: dict[str, Any]  # the few non-identifying attributes medrag keeps


_KEEP = ("Modality", "BodyPartExamined", "ViewPosition", "StudyInstanceUID", "SeriesInstanceUID",
         "SOPInstanceUID", "InstanceNumber", "PatientID", "StudyDate", "StudyDescription",
         "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "BurnedInAnnotation",
         "AccessionNumber")


def read_header(source: str | Path | bytes) -> dict[str, Any]:
    """The attributes medrag uses, without decoding pixels (fast, for grouping studies)."""
    try:
        ds = _dcmread(source, stop_before_pixels=True)
    except BudgetExceeded as exc:
        raise DicomDecodeError(str(exc)) from exc
    try:
        return _header(ds)  # pydicom parses values lazily: a broken element fails here
    except Exception as exc:
        label = str(source) if not isinstance(source, bytes) else "<upload>"
        raise DicomDecodeError(f"{label}: malformed DICOM header ({type(exc).__name__}: {exc})") from exc


def decode_dicom(source: str | Path | bytes, name: str | None = None,
                 budget: DecodeBudget = _budget.DEFAULT, wait: float | None = None) -> DicomImage:
    """Decode one DICOM object (path or bytes) into a :class:`DicomImage`.

    The decode budget is checked against the deflated size and every frame's codestream (SIZ,
    SOFn) before pixels are decoded, and the decode holds its working memory from the
    process-wide pool (waiting at most ``wait`` seconds).

    Raises:
        DicomDecodeError: not DICOM, no pixel data, unsupported or corrupt encoding, or
            dimensions beyond :data:`MAX_PIXELS`.
        BudgetExceeded: declared, codestream or inflated size over ``budget``.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    ds = _dcmread(source, stop_before_pixels=False, label=label, budget=budget)
    try:
        declared = _budget.dicom_size(ds)
        _budget.check(declared, label, budget)
        with _budget.reserve(declared, label, wait):
            return _decode(ds, label)
    except (DicomDecodeError, BudgetExceeded, TimeoutError):
        raise
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: B036
        # malformed headers surface as many exception types, and the Rust codecs (pylibjpeg-rle,
        # pyjpegls) report corrupt streams as pyo3 PanicException, a BaseException (found by fuzzing)
        raise DicomDecodeError(f"{label}: malformed DICOM ({type(exc).__name__}: {exc})") from exc


def _decode(ds: Any, label: str) -> DicomImage:
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DicomDecodeError(f"{label}: no pixel data (not an image object)")
    rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
    frames = as_int(ds.get("NumberOfFrames"), 1)
    if rows <= 0 or cols <= 0:
        raise DicomDecodeError(f"{label}: invalid image size {rows}x{cols}")
    if rows * cols * frames > MAX_PIXELS:
        raise DicomDecodeError(f"{label}: {frames} frame(s) of {rows}x{cols} exceed the limit of "
                               f"{MAX_PIXELS} pixels")
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        index = frames // 2 if frames > 1 else None
        arr = ds.pixel_array if index is None else _frame(ds, index)
    except Exception as exc:  # pydicom raises many types for bad or unsupported encodings
        tsuid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        ts = getattr(tsuid, "name", str(tsuid))
        raise DicomDecodeError(
            f"{label}: cannot decode pixel data ({ts}): {exc}. Compressed syntaxes need "
            "pylibjpeg + pylibjpeg-openjpeg (JPEG 2000), pyjpegls (JPEG-LS) or pylibjpeg-rle."
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    try:
        if photometric in ("MONOCHROME1", "MONOCHROME2"):
            arr = apply_modality_lut(arr, ds)
            has_voi = "WindowCenter" in ds or "VOILUTSequence" in ds
            arr = apply_voi_lut(arr, ds, index=0) if has_voi else arr
            out = _normalise(np.asarray(arr, dtype=np.float64), percentile=not has_voi)
            if photometric == "MONOCHROME1":
                out = 1.0 - out
        else:
            out = _to_gray(arr, ds, photometric)
    except DicomDecodeError:
        raise
    except Exception as exc:
        raise DicomDecodeError(f"{label}: cannot apply LUTs ({photometric}): {exc}") from exc
    if out.ndim != 2:
        raise DicomDecodeError(f"{label}: unexpected decoded shape {out.shape}")
    return DicomImage(out.astype(np.float32), _header(ds))


def is_dicom(head: bytes) -> bool:
    """True for the Part 10 preamble ("DICM" at offset 128)."""
    return len(head) >= 132 and head[128:132] == b"DICM"


# ---- internals -------------------------------------------------------------------------------
def _guard(source: str | Path | bytes, label: str, budget: DecodeBudget) -> str | Path | bytes:
    """Refuse special files and deflate bombs before pydicom reads anything (it would block on a
    FIFO, read /dev/zero forever, and inflate a deflated dataset whole in one call)."""
    if isinstance(source, bytes):
        _budget.check_dicom_bytes(source, label, budget)
        return source
    _budget.check_regular(source, label)
    with open(source, "rb") as f:
        head = f.read(1 << 16)
    if _budget.dicom_transfer_syntax(head)[0] == _budget.DEFLATED_TS:
        data = _budget.read_regular(source, label, budget)
        _budget.check_dicom_bytes(data, label, budget)
        return data
    return source


def _dcmread(source: str | Path | bytes, stop_before_pixels: bool, label: str | None = None,
             budget: DecodeBudget = _budget.DEFAULT) -> Any:
    import pydicom
    from pydicom.errors import InvalidDicomError

    # Real archives are full of slightly invalid values (a UID with letters, IS "1A"); they do not
    # stop a radiologist's viewer and must not flood logs or stop a build. Decoding errors still do.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

    label = label or (str(source) if not isinstance(source, bytes) else "<upload>")
    try:
        source = _guard(source, label, budget)
    except FileNotFoundError as exc:
        raise DicomDecodeError(f"{label}: file not found") from exc
    except _budget.NotRegularFile as exc:
        raise DicomDecodeError(str(exc)) from exc
    except OSError as exc:
        raise DicomDecodeError(f"{label}: cannot read ({exc.strerror})") from exc
    try:
        fp: Any = io.BytesIO(source) if isinstance(source, bytes) else str(source)
        return pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise DicomDecodeError(f"{label}: not a DICOM file ({exc})") from exc
    except FileNotFoundError as exc:
        raise DicomDecodeError(f"{label}: file not found") from exc
    except Exception as exc:
        raise DicomDecodeError(f"{label}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc


def _frame(ds: Any, index: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    return np.asarray(pixel_array(ds, index=index))


def _normalise(arr: np.ndarray, percentile: bool) -> np.ndarray:
    if percentile:
        lo, hi = np.percentile(arr, [0.5, 99.5])
    else:
        lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(arr.shape[:2], dtype=np.float64)
    out: np.ndarray = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    return out


def _to_gray(arr: np.ndarray, ds: Any, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    elif photometric.startswith("YBR") and photometric not in ("YBR_ICT", "YBR_RCT"):
        arr = convert_color_space(arr, photometric, "RGB")
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., 0] * 0.299 + arr[..., 1] * 0.587 + arr[..., 2] * 0.114
    return _normalise(arr, percentile=False)


def _header(ds: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in _KEEP:
        value = ds.get(key)
        if value is not None and value != "":
            out[key] = str(value) if not isinstance(value, int) else value
    return out
