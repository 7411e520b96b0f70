"""Uploaded images: type from content, size/frames/pixel limits before decoding, a decode deadline.

The limits are the shared decode budget (:mod:`retrieval.imaging.budget`, also used by builds):
the deflated size and every frame's codestream are checked before allocating (413 above them),
and decodes share one process-wide memory pool sized by ``Settings.decode_memory_bytes``.

A hostile or broken upload must cost a bounded amount of memory and time and end in a 4xx with
a reason, never a worker stuck decoding a 60 000 x 60 000 "PNG" or a 10 000-frame DICOM.
Messages name the form field, never the client's file name (it can carry a patient's name).
"""

from __future__ import annotations

import io

import anyio
import numpy as np

from api.settings import Settings
from retrieval.imaging import budget as _budget
from retrieval.imaging.images import ImageLoadError, ImageTooLarge, load_image, sniff


class UploadError(ValueError):
    """Rejected upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_budget(settings: Settings) -> _budget.DecodeBudget:
    """The shared decode budget with this service's limits."""
    return _budget.DecodeBudget(max_pixels=settings.max_upload_pixels, max_frames=settings.max_upload_frames,
                                max_bytes=settings.max_decode_bytes, max_file_bytes=settings.max_upload_bytes)


def check(data: bytes, field: str, settings: Settings) -> str:
    """Validate an upload before decoding; returns its kind (png/jpeg/dicom)."""
    if not data:
        raise UploadError(f"{field}: empty upload")
    if len(data) > settings.max_upload_bytes:
        raise UploadError(f"{field}: {len(data)} bytes exceeds the {settings.max_upload_bytes}-byte limit", 413)
    kind = sniff(data[:132])
    if kind is None:
        raise UploadError(f"{field}: not a PNG, JPEG or DICOM file (checked by content)", 415)
    if kind == "dicom":
        try:  # a deflated dataset is inflated (counted, not kept) before anything parses it
            _budget.check_dicom_bytes(data, field, decode_budget(settings))
        except _budget.BudgetExceeded as exc:
            raise UploadError(str(exc), 413) from exc
        _check_dicom_header(data, field, settings)
    else:
        _check_raster_header(data, field, settings)
    return kind


def _check_dicom_header(data: bytes, field: str, settings: Settings) -> None:
    from retrieval.imaging.dicom import DicomDecodeError, as_int, read_header

    try:
        h = read_header(data)
    except DicomDecodeError as exc:
        raise UploadError(f"{field}: unreadable DICOM ({_reason(exc)})") from exc
    rows, cols, frames = as_int(h.get("Rows")), as_int(h.get("Columns")), max(1, as_int(h.get("NumberOfFrames"), 1))
    if frames > settings.max_upload_frames:
        raise UploadError(f"{field}: {frames} frames exceeds the {settings.max_upload_frames}-frame limit", 413)
    if rows * cols * frames > settings.max_upload_pixels:
        raise UploadError(f"{field}: {cols}x{rows}x{frames} exceeds the {settings.max_upload_pixels}-pixel limit", 413)


def _check_raster_header(data: bytes, field: str, settings: Settings) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:  # reads the header only
            w, h = im.size
    except Image.DecompressionBombError as exc:
        raise UploadError(f"{field}: declared size exceeds the {settings.max_upload_pixels}-pixel limit", 413) from exc
    except Exception as exc:  # noqa: BLE001 (Pillow's error types vary: OSError ... SyntaxError)
        raise UploadError(f"{field}: corrupt image ({type(exc).__name__})") from exc
    if w * h > settings.max_upload_pixels:
        raise UploadError(f"{field}: {w}x{h} exceeds the {settings.max_upload_pixels}-pixel limit", 413)


async def decode(data: bytes, field: str, settings: Settings) -> np.ndarray:
    """Check, then decode in a worker thread under a deadline."""
    check(data, field, settings)
    _budget.configure_pool(settings.decode_memory_bytes)
    budget = decode_budget(settings)
    try:
        with anyio.fail_after(settings.decode_timeout_s):
            return await anyio.to_thread.run_sync(
                lambda: load_image(data, name=field, budget=budget, wait=settings.decode_timeout_s),
                abandon_on_cancel=True)
    except TimeoutError as exc:
        raise UploadError(f"{field}: decoding took longer than {settings.decode_timeout_s:.0f}s", 422) from exc
    except ImageTooLarge as exc:
        raise UploadError(str(exc), 413) from exc
    except ImageLoadError as exc:
        raise UploadError(str(exc)) from exc


def _reason(exc: Exception) -> str:
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text
