"""Load any supported image (PNG, JPEG, DICOM) from a path or bytes into one array format.

Every encoder receives float32 (H, W) grayscale in [0, 1]: radiographs are grayscale, and one
format means the encoders never see file types. The format is sniffed from content, never from
the file name, so a renamed file or a hostile upload cannot pick a decoder.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from retrieval.imaging import budget as _budget
from retrieval.imaging.budget import BudgetExceeded, DecodeBudget
from retrieval.imaging.dicom import DicomDecodeError, decode_dicom, is_dicom

MAX_SIDE = 16384  # refuse decompression bombs before decoding
MIN_SIDE = 8


class ImageLoadError(ValueError):
    """An image that cannot be loaded; the message names the file and the reason."""


class ImageTooLarge(ImageLoadError):
    """Over the decode budget (declared pixels, codestream size, inflated size, file size or
    decode memory): the API answers 413, a build skips the file."""


def sniff(head: bytes) -> str | None:
    """'png', 'jpeg', 'dicom' or None, from the first bytes of a file."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if is_dicom(head):
        return "dicom"
    return None


def load_image(source: str | Path | bytes, name: str | None = None,
               budget: DecodeBudget = _budget.DEFAULT, wait: float | None = None) -> np.ndarray:
    """Decode ``source`` into float32 (H, W) in [0, 1].

    Sizes are checked against ``budget`` before decoding (see :mod:`retrieval.imaging.budget`),
    special files (FIFO, /dev/zero) are refused without being opened for a blocking read, and the
    decode holds its working memory from the process-wide pool (waiting at most ``wait`` s).

    Raises:
        ImageTooLarge: over the decode budget.
        ImageLoadError: missing or special file, unknown format, corrupt data, or sizes out of bounds.
        TimeoutError: no decode memory became free within ``wait`` seconds.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<upload>")
    try:
        return _load(source, label, budget, wait)
    except BudgetExceeded as exc:
        raise ImageTooLarge(str(exc)) from exc


def _load(source: str | Path | bytes, label: str, budget: DecodeBudget, wait: float | None) -> np.ndarray:
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = _budget.read_regular(source, label, budget)
        except _budget.NotRegularFile as exc:
            raise ImageLoadError(str(exc)) from exc
        except FileNotFoundError as exc:
            raise ImageLoadError(f"{label}: file not found") from exc
        except OSError as exc:
            raise ImageLoadError(f"{label}: cannot read ({exc.strerror})") from exc
    kind = sniff(data[:132])
    if kind is None:
        raise ImageLoadError(f"{label}: not a PNG, JPEG or DICOM file")
    if kind == "dicom":
        try:
            arr = decode_dicom(data, name=label, budget=budget, wait=wait).pixels
        except DicomDecodeError as exc:
            raise ImageLoadError(str(exc)) from exc
    else:
        declared = _budget.raster_size(data)
        if declared is not None:
            _budget.check(declared, label, budget)
            with _budget.reserve(declared, label, wait):
                arr = _load_raster(data, label)
        else:
            arr = _load_raster(data, label)
    h, w = arr.shape
    if min(h, w) < MIN_SIDE:
        raise ImageLoadError(f"{label}: image too small ({w}x{h})")
    return arr


def pixel_key(image: np.ndarray) -> str:
    """Content key of decoded pixels: the same image gives the same key whatever its file name,
    study id or container (PNG copy, re-exported DICOM), so a query never finds itself."""
    import hashlib

    q = (np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
    h = hashlib.sha256(f"{q.shape[0]}x{q.shape[1]}|".encode())
    h.update(q.tobytes())
    return h.hexdigest()[:24]


def _load_raster(data: bytes, label: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if max(im.size) > MAX_SIDE:
                raise ImageLoadError(f"{label}: image {im.size[0]}x{im.size[1]} exceeds {MAX_SIDE} px")
            im.load()
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                lo, hi = float(arr.min()), float(arr.max())
                arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
                return arr.astype(np.float32)
            gray = im.convert("L")
            return np.asarray(gray, dtype=np.float32) / 255.0
    except ImageLoadError:
        raise
    except Exception as exc:  # noqa: BLE001
        # Pillow reports corrupt streams as many types: OSError, ValueError, EOFError, struct.error,
        # even SyntaxError ("broken PNG file", found by fuzzing)
        reason = "unrecognised image data" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise ImageLoadError(f"{label}: corrupt image ({reason})") from exc
