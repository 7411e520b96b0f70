"""One decode budget for every image medrag decodes: uploads (the API) and builds (the indexer).

Why here: a decoder allocates what the *codestream* declares, not what a DICOM header says. A
154 KB JPEG 2000 DICOM whose SIZ marker declares 20000 x 20000 pixels, or a 1 MB deflated DICOM
that inflates to 1 GiB of zeros, passes a Rows/Columns check and then costs gigabytes. So the
size is read from the real stream before anything is allocated:

* PNG: the IHDR chunk (width, height, bit depth, colour type);
* JPEG / JPEG-LS / JPEG lossless: the SOFn marker (precision, height, width, components);
* JPEG 2000 (raw codestream or JP2 box, alone or inside encapsulated DICOM pixel data, every
  frame): the SIZ marker (Xsiz - XOsiz, Ysiz - YOsiz, components and their depths);
* deflated DICOM (transfer syntax 1.2.840.10008.1.2.1.99): the dataset is inflated with a
  streaming ``zlib.decompressobj`` whose output is counted and thrown away, stopping as soon as
  it passes the budget (pydicom itself inflates the whole file in one call).

pixels x frames x samples x bytes-per-sample must fit :attr:`DecodeBudget.max_bytes`; every
refusal is a :class:`BudgetExceeded` naming the file (callers answer HTTP 413 or skip the file).

Memory is also bounded across threads: :func:`reserve` takes the estimated working memory of a
decode from one process-wide pool (:func:`configure_pool`), so 24 concurrent uploads of a large
JPEG wait for each other instead of decoding at once.
"""

from __future__ import annotations

import os
import stat
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFLATED_TS = "1.2.840.10008.1.2.1.99"
# working memory of one decode per pixel besides the decoded samples: the float64/float32 copies
# that windowing and normalisation make (measured peak of load_image is about 2-3 of them)
_WORK_BYTES_PER_PIXEL = 16


class BudgetExceeded(ValueError):
    """An image whose declared or inflated size is over the decode budget; the message names it."""


class NotRegularFile(ValueError):
    """A path that is not a regular file (FIFO, device, socket, directory): never opened for reading."""


@dataclass(frozen=True)
class DecodeBudget:
    """Limits of one decode. The defaults are the build's; the API passes its settings."""

    max_pixels: int = 64_000_000  # width * height * frames
    max_frames: int = 512  # frames of a multi-frame DICOM
    max_bytes: int = 512 * 1024 * 1024  # pixels * frames * samples * bytes per sample, decoded
    max_file_bytes: int = 1024 * 1024 * 1024  # bytes read from one file (a cap, not a size guess)
    inflate_slack: int = 16 * 1024 * 1024  # non-pixel elements allowed in an inflated dataset


DEFAULT = DecodeBudget()


@dataclass(frozen=True)
class Declared:
    """What a stream declares it decodes to."""

    width: int
    height: int
    frames: int = 1
    samples: int = 1
    bytes_per_sample: int = 1

    @property
    def pixels(self) -> int:
        return self.width * self.height * self.frames

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.samples * self.bytes_per_sample

    @property
    def work_bytes(self) -> int:
        """Estimated peak memory of decoding one frame (what :func:`reserve` takes)."""
        return self.width * self.height * (self.samples * self.bytes_per_sample + _WORK_BYTES_PER_PIXEL)


# ---- files -------------------------------------------------------------------------------------
def read_regular(path: str | Path, label: str, budget: DecodeBudget = DEFAULT) -> bytes:
    """The bytes of a regular file, at most ``budget.max_file_bytes``.

    A FIFO would block ``open`` forever and ``/dev/zero`` never ends, so the type is checked with
    ``stat`` before opening, the file is opened non-blocking and checked again with ``fstat``
    (the path may have been swapped in between), and the read is capped.

    Raises:
        NotRegularFile: FIFO, device, socket or directory.
        BudgetExceeded: the file is larger than the cap.
        OSError: missing or unreadable (FileNotFoundError included).
    """
    check_regular(path, label)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{label}: not a regular file ({_kind(st.st_mode)}); refused")
        if st.st_size > budget.max_file_bytes:
            raise BudgetExceeded(f"{label}: {st.st_size} bytes exceeds the {budget.max_file_bytes}-byte file limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(budget.max_file_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > budget.max_file_bytes:  # grew while reading
        raise BudgetExceeded(f"{label}: more than {budget.max_file_bytes} bytes; refused")
    return data


def check_regular(path: str | Path, label: str) -> None:
    """Raise :class:`NotRegularFile` unless ``path`` (symlinks followed) is a regular file."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{label}: not a regular file ({_kind(st.st_mode)}); refused")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


# ---- declared sizes ----------------------------------------------------------------------------
def check(declared: Declared, label: str, budget: DecodeBudget = DEFAULT) -> None:
    """Raise :class:`BudgetExceeded` if ``declared`` is over ``budget``."""
    if declared.width <= 0 or declared.height <= 0:
        return  # not a size; the decoder reports the stream as corrupt
    if declared.frames > budget.max_frames:
        raise BudgetExceeded(f"{label}: {declared.frames} frames exceeds the {budget.max_frames}-frame limit")
    if declared.pixels > budget.max_pixels:
        size = f"{declared.width}x{declared.height}"
        what = f"image {size} exceeds" if declared.frames == 1 else f"{declared.frames} frame(s) of {size} exceed"
        raise BudgetExceeded(f"{label}: {what} the limit of {budget.max_pixels} pixels")
    if declared.decoded_bytes > budget.max_bytes:
        raise BudgetExceeded(f"{label}: decodes to {declared.decoded_bytes} bytes, over the "
                             f"{budget.max_bytes}-byte decode limit")


def raster_size(data: bytes) -> Declared | None:
    """Declared size of a PNG (IHDR) or JPEG (first SOFn); None if not found."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return png_size(data)
    if data.startswith(b"\xff\xd8"):
        return jpeg_size(data)
    return None


def png_size(data: bytes) -> Declared | None:
    if len(data) < 33 or data[12:16] != b"IHDR":
        return None
    w, h, depth, colour = struct.unpack(">IIBB", data[16:26])
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    return Declared(w, h, 1, samples, max(1, depth // 8))


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def jpeg_size(data: bytes, limit: int = 1 << 20) -> Declared | None:
    """Walk JPEG marker segments from SOI to the first SOFn (baseline, lossless, JPEG-LS SOF55)."""
    i, n = 2, min(len(data), limit)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2:i + 4])
        if marker in _SOF and i + 10 <= n:
            precision, h, w, comps = struct.unpack(">BHHB", data[i + 4:i + 10])
            return Declared(w, h, 1, max(1, comps), 1 if precision <= 8 else 2)
        if marker == 0xDA or length < 2:
            return None
        i += 2 + length
    return None


def j2k_size(data: bytes, limit: int = 1 << 20) -> Declared | None:
    """SIZ of a JPEG 2000 codestream (raw, or the first one inside a JP2 file)."""
    at = data.find(b"\xff\x4f\xff\x51", 0, limit)
    if at < 0 or at + 42 > len(data):
        return None
    xsiz, ysiz, xo, yo = struct.unpack(">IIII", data[at + 8:at + 24])
    (csiz,) = struct.unpack(">H", data[at + 40:at + 42])
    depths = [(b & 0x7F) + 1 for b in data[at + 42:at + 42 + 3 * min(csiz, 16):3]]
    bps = 1 if max(depths or [8]) <= 8 else 2 if max(depths) <= 16 else 4
    return Declared(max(0, xsiz - xo), max(0, ysiz - yo), 1, max(1, csiz), bps)


def stream_size(data: bytes) -> Declared | None:
    """Declared size of one compressed frame: JPEG 2000 SIZ or JPEG SOFn."""
    if data[:2] == b"\xff\xd8":
        return jpeg_size(data)
    return j2k_size(data)


# ---- DICOM ---------------------------------------------------------------------------------
def dicom_transfer_syntax(head: bytes) -> tuple[str | None, int]:
    """(Transfer Syntax UID, offset where the dataset starts) from the group-0002 file meta."""
    i, ts = 132, None
    ulong = {b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"}
    while i + 8 <= len(head):
        group, elem = struct.unpack("<HH", head[i:i + 4])
        if group != 0x0002:
            break
        vr = head[i + 4:i + 6]
        if vr in ulong:
            if i + 12 > len(head):
                break
            (length,) = struct.unpack("<I", head[i + 8:i + 12])
            start = i + 12
        else:
            (length,) = struct.unpack("<H", head[i + 6:i + 8])
            start = i + 8
        if elem == 0x0010:
            ts = head[start:start + length].rstrip(b"\x00 ").decode("ascii", "replace")
        i = start + length
    return ts, i


def check_deflated(data: bytes, offset: int, label: str, budget: DecodeBudget = DEFAULT) -> None:
    """Inflate a deflated dataset in 1 MiB steps, counting and discarding, and stop past the budget."""
    limit = budget.max_bytes + budget.inflate_slack
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, memoryview(data)[offset:]
    step = 1 << 20
    try:
        while True:
            out = d.decompress(pending, step)
            total += len(out)
            if total > limit:
                raise BudgetExceeded(f"{label}: deflated DICOM inflates past the {limit}-byte decode limit")
            pending = memoryview(d.unconsumed_tail)
            if not out and not pending:
                break
    except zlib.error:
        return  # corrupt stream: pydicom reports it with the file named
    del out


def as_int(value: Any, default: int = 0) -> int:
    """Integer of a DICOM IS/US value; ``default`` for missing or malformed ("1A") values (here, not
    in :mod:`retrieval.imaging.dicom`, which imports this module: no import cycle)."""
    try:
        return int(str(value).strip()) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def dicom_size(ds: Any) -> Declared:
    """Declared size from the header; for encapsulated pixel data, the largest frame codestream."""
    from pydicom.encaps import generate_frames  # pydicom: heavy, only for DICOM uploads and builds

    get = ds.get
    rows, cols = as_int(get("Rows")), as_int(get("Columns"))
    frames = max(1, as_int(get("NumberOfFrames"), 1))
    samples = max(1, as_int(get("SamplesPerPixel"), 1))
    bits = as_int(get("BitsAllocated"), 8)
    bps = max(1, (bits + 7) // 8)
    header = Declared(cols, rows, frames, samples, bps)
    meta = getattr(ds, "file_meta", None)
    compressed = bool(meta is not None and getattr(getattr(meta, "TransferSyntaxUID", None), "is_compressed", False))
    if not compressed or "PixelData" not in ds:
        return header
    worst = header
    try:
        for n, frame in enumerate(generate_frames(get("PixelData"), number_of_frames=frames)):
            found = stream_size(bytes(frame[:1 << 16]))
            if found is not None and found.width * found.height * found.samples * found.bytes_per_sample > \
                    worst.width * worst.height * worst.samples * worst.bytes_per_sample:
                worst = Declared(found.width, found.height, frames, found.samples, found.bytes_per_sample)
            if n + 1 >= frames:
                break
    except Exception:  # noqa: BLE001 (malformed encapsulation: the decoder names it later)
        return worst
    return worst


def check_dicom_bytes(data: bytes, label: str, budget: DecodeBudget = DEFAULT) -> None:
    """Before pydicom parses ``data``: a deflated dataset must not inflate past the budget."""
    ts, offset = dicom_transfer_syntax(data[:1 << 16])
    if ts == DEFLATED_TS:
        check_deflated(data, offset, label, budget)


# ---- memory pool -------------------------------------------------------------------------------
class _Pool:
    """A counting semaphore over bytes: decodes wait until their working memory fits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, amount: int, label: str, timeout: float | None) -> int:
        if amount > self.capacity:
            raise BudgetExceeded(f"{label}: decoding needs about {amount} bytes, over the "
                                 f"{self.capacity}-byte decode memory limit")
        with self.cond:
            if not self.cond.wait_for(lambda: self.used + amount <= self.capacity, timeout):
                raise TimeoutError(f"{label}: waited {timeout}s for decode memory")
            self.used += amount
        return amount

    def release(self, amount: int) -> None:
        with self.cond:
            self.used -= amount
            _trim()
            self.cond.notify_all()


def _trim() -> None:
    """Give freed decode memory back to the OS. Pillow decodes in 16 MB blocks, below glibc's
    mmap threshold, so each worker thread's malloc arena keeps hundreds of MB after a decode;
    with 24 upload threads that alone was 3 GB RSS (measured). No-op off glibc."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim: Any = None


_pool = _Pool(2 * 1024 * 1024 * 1024)
_pool_lock = threading.Lock()


def configure_pool(capacity_bytes: int) -> None:
    """Set the process-wide decode memory (the API sets it from its settings; idempotent)."""
    global _pool
    with _pool_lock:
        if _pool.capacity != capacity_bytes:
            with _pool.cond:
                if _pool.used == 0:
                    _pool = _Pool(capacity_bytes)
                else:  # decodes in flight keep their reservations; new ones see the new capacity
                    _pool.capacity = capacity_bytes
                    _pool.cond.notify_all()


def pool_capacity() -> int:
    return _pool.capacity


@contextmanager
def reserve(declared: Declared, label: str, timeout: float | None = None) -> Iterator[None]:
    """Hold ``declared.work_bytes`` of the process-wide decode memory while decoding."""
    with reserve_bytes(declared.work_bytes, label, timeout):
        yield


@contextmanager
def reserve_bytes(amount: int, label: str, timeout: float | None = None) -> Iterator[None]:
    """Hold ``amount`` bytes of the process-wide decode memory (a CT volume's working memory,
    which is not one frame's: :mod:`retrieval.imaging.volume`)."""
    pool = _pool
    amount = pool.acquire(amount, label, timeout)
    try:
        yield
    finally:
        pool.release(amount)
