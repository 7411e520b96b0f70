"""A CT series (a folder or a list of DICOM files, or one multi-frame object) -> one volume in
Hounsfield units, on the 3D tower's grid: the volumetric counterpart of :func:`load_image`.

**Orientation, said once for all of medrag.** A :class:`Volume` array is indexed ``[x, y, z]`` in
RAS: the index grows toward the patient's Right (x), Anterior (y) and Superior (z). DICOM's
patient coordinates are LPS (x toward the Left, y toward Posterior); the conversion is
:data:`LPS_TO_RAS`, used only here. Displays use the radiological convention
(:func:`axial_display`): the patient's right on the image's left, anterior at the top.

What a series must be, and what happens when it is not (every refusal is a
:class:`VolumeError` naming what is wrong, never the patient):

* slices are grouped by SeriesInstanceUID (several series in one source: refused unless
  ``series_uid`` picks one); localizers (ImageType LOCALIZER) are dropped;
* slices are ordered by ImagePositionPatient projected on the slice normal (the cross product
  of ImageOrientationPatient's row and column directions), never by InstanceNumber; a slice
  without position or orientation is refused, as are mixed orientations, sizes or pixel spacings;
* two slices at one position: the first by InstanceNumber is kept, the rest dropped (noted);
* uneven spacing and missing slices: the volume is interpolated on the real positions, so an
  uneven stack lands on an even grid; a gap wider than ``max_gap_mm`` is refused (an incomplete
  series is not filled with invented anatomy);
* gantry tilt (positions sheared in the slice plane): each slice is shifted back in-plane on
  resampling, so the grid is orthogonal; tilt beyond ``MAX_TILT_DEG`` is refused;
* an oblique acquisition is put on the nearest axis-aligned RAS grid (its angle is noted);
  beyond ``MAX_OBLIQUE_DEG`` it is refused (an oblique resampler is not implemented);
* multi-frame (enhanced) CT: frames are placed by their per-frame PlanePositionSequence; a
  multi-frame object without per-frame positions is refused;
* stored values go through the Modality LUT (RescaleSlope/Intercept) to HU; non-CT modalities
  are refused (HU and a CT window mean nothing for them).

Decode budget: the same :class:`~retrieval.imaging.budget.DecodeBudget` machinery as 2D. The
declared volume (rows x columns x slices or frames x bytes) is checked against
:data:`VOLUME_BUDGET` from headers read without pixels, before anything is decoded or
allocated (a declared 4096^3 volume is refused there), every file's codestream against the 2D
budget, and the working memory is held from the process-wide decode pool. Slices are decoded
one at a time and resampled in-plane at once, so the full-resolution volume is never held.

Resampling is linear (trilinear overall, no anti-aliasing: what Merlin's preprocessing does),
onto ``grid.spacing`` mm, centred on the series, cropped or padded with air to the tower's
shape (:class:`CTGrid`). :func:`tower_input` applies the tower's HU window.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retrieval.imaging import budget as _budget
from retrieval.imaging.budget import BudgetExceeded, DecodeBudget, as_int
from retrieval.imaging.dicom import DicomDecodeError, _dcmread
from retrieval.imaging.images import ImageLoadError, ImageTooLarge

ORIENTATION = "RAS"  # array axes [x, y, z] grow toward the patient's Right, Anterior, Superior
LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])  # DICOM patient coordinates (LPS) -> RAS, component-wise
AIR_HU = -1024.0  # fill outside the scanned field (padding, the part of a tilted slice not seen)
MAX_TILT_DEG = 30.0
MAX_OBLIQUE_DEG = 30.0
MIN_SLICES = 3
LOCALIZER = "LOCALIZER"

# A volume is many frames: the 2D default (64 M pixels, 512 frames) would refuse an ordinary thin
# chest CT (512 x 512 x 600 slices = 157 M voxels). These bound one series at 1024 slices of 512^2
# (or 256 of 1024^2), 1 GiB of stored samples: 4096^3 is 256 times over.
VOLUME_BUDGET = DecodeBudget(max_pixels=512 * 512 * 1024, max_frames=2048, max_bytes=1024 * 1024 * 1024)


class VolumeError(ImageLoadError):
    """A series that cannot become a volume; the message says why (never a patient attribute)."""


@dataclass(frozen=True)
class CTGrid:
    """The 3D tower's input grid (the defaults are Merlin's/Astra's I3D ResNet-152: see
    :mod:`retrieval.encoders.ct3d`)."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 3.0)  # mm along x, y, z (RAS)
    shape_xy: tuple[int, int] = (224, 224)  # in-plane voxels (centre crop / air pad)
    max_z: int = 160  # at most this many z voxels (centre crop)
    z_multiple: int = 16  # z is padded with air up to a multiple of this (the tower's z stride)
    window: tuple[float, float] = (-1000.0, 200.0)  # HU mapped to [0, 1] (Astra's chest window)
    max_gap_mm: float = 10.0  # a wider hole between neighbouring slices is refused


DEFAULT_GRID = CTGrid()


@dataclass
class VolumeInfo:
    """What was found and done; non-identifying (no UIDs, no patient attributes)."""

    slices: int = 0  # slices (or frames) used
    source_shape: tuple[int, int] = (0, 0)  # rows, columns of one slice
    source_spacing: tuple[float, float, float] = (0.0, 0.0, 0.0)  # row, column, median slice step (mm)
    slice_step_range: tuple[float, float] = (0.0, 0.0)  # smallest and largest step between slices (mm)
    duplicates_dropped: int = 0
    localizers_dropped: int = 0
    unreadable_skipped: int = 0  # files that are not DICOM at all
    corrupt_dropped: int = 0  # slices whose pixel data would not decode (treated as missing)
    gaps_filled: int = 0  # steps wider than 1.5x the median, interpolated across
    uneven: bool = False  # steps differ by more than 10% of the median
    tilt_deg: float = 0.0  # shear of the positions in the slice plane, corrected
    oblique_deg: float = 0.0  # largest angle between an array axis and its RAS axis (not corrected)
    multiframe: bool = False
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Volume:
    """HU on the tower grid, ``hu[x, y, z]`` in :data:`ORIENTATION` (RAS)."""

    hu: np.ndarray  # float32 (X, Y, Z)
    spacing: tuple[float, float, float]  # mm along x, y, z
    valid: np.ndarray  # bool (X, Y, Z): inside the scanned field (False: padding)
    info: VolumeInfo
    header: dict[str, Any]  # Modality, StudyInstanceUID, SeriesInstanceUID (for grouping; callers pseudonymise)


@dataclass
class _Slice:
    path: str
    frame: int | None  # index into a multi-frame object
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    orientation: np.ndarray  # 6 direction cosines
    pixel_spacing: tuple[float, float]  # row step, column step (mm)
    rows: int
    cols: int
    bytes_per_sample: int
    instance: int
    rescale: tuple[float, float] | None = None  # multi-frame: slope, intercept of this frame


# ---- public API ------------------------------------------------------------------------------
def load_series(source: str | Path | Sequence[str | Path], grid: CTGrid = DEFAULT_GRID,
                series_uid: str | None = None, budget: DecodeBudget = VOLUME_BUDGET,
                wait: float | None = None, name: str | None = None) -> Volume:
    """Decode one CT series into a :class:`Volume` on ``grid``.

    Args:
        source: a folder (every file under it), a list of files/folders, or one multi-frame file.
        series_uid: which series when the source holds several.
        budget: declared-size limits of the whole volume (the 2D default applies to each file).
        wait: seconds to wait for decode memory from the process-wide pool.

    Raises:
        VolumeError: not a usable CT series (the message says what cannot be handled).
        ImageTooLarge: the declared volume or a file is over the budget.
    """
    label = name or (str(source) if isinstance(source, (str, Path)) else f"<series of {len(source)} files>")
    files = _expand(source, label)
    info = VolumeInfo()
    heads: list[tuple[str, Any]] = []
    for f in files:
        try:
            heads.append((f, _dcmread(f, stop_before_pixels=True, label=os.path.basename(f))))
        except DicomDecodeError:
            info.unreadable_skipped += 1
    if not heads:
        raise VolumeError(f"{label}: no readable DICOM file")
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for _, ds in heads)
    if series_uid is not None:
        heads = [(f, ds) for f, ds in heads if str(ds.get("SeriesInstanceUID", "")) == series_uid]
        if not heads:
            raise VolumeError(f"{label}: no file of the requested series")
    elif len(series) > 1:
        sizes = ", ".join(str(n) for _, n in series.most_common())
        raise VolumeError(f"{label}: {len(series)} series in one source (files per series: {sizes}); "
                          "pass series_uid or give one series folder")
    first = heads[0][1]
    modality = str(first.get("Modality", "")).upper()
    if modality != "CT":
        raise VolumeError(f"{label}: modality {modality or 'unknown'} is not CT (Hounsfield units and a CT "
                          "window do not apply)")
    slices = _slices(heads, label, info, budget)
    slices, positions = _order(slices, label, info, grid)
    vol, valid, spacing = _resample(slices, positions, grid, label, info, budget, wait)
    header = {k: str(first.get(k)) for k in ("Modality", "StudyInstanceUID", "SeriesInstanceUID") if first.get(k)}
    return Volume(vol, spacing, valid, info, header)


def tower_input(volume: Volume, grid: CTGrid = DEFAULT_GRID) -> np.ndarray:
    """float32 [x, y, z] in [0, 1]: ``grid.window`` HU mapped linearly, clipped (air pads are 0)."""
    lo, hi = grid.window
    out: np.ndarray = np.clip((volume.hu - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    return out


def axial_display(arr: np.ndarray, z: int) -> np.ndarray:
    """Axial slice ``z`` of an [x, y, z] RAS array as an image in the radiological convention:
    rows from anterior (top) to posterior, columns from the patient's right (left) to left."""
    out: np.ndarray = np.ascontiguousarray(arr[::-1, ::-1, z].T)
    return out


def group_series(source: str | Path | Sequence[str | Path]) -> dict[str, list[str]]:
    """Files of ``source`` by SeriesInstanceUID (headers only; unreadable files left out)."""
    out: dict[str, list[str]] = {}
    for f in _expand(source, str(source)):
        try:
            ds = _dcmread(f, stop_before_pixels=True, label=os.path.basename(f))
        except DicomDecodeError:
            continue
        out.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(f)
    return out


# ---- headers -> slices -----------------------------------------------------------------------
def _expand(source: str | Path | Sequence[str | Path], label: str) -> list[str]:
    items = [source] if isinstance(source, (str, Path)) else list(source)
    files: list[str] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files.extend(str(f) for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith("."))
        elif p.exists():
            files.append(str(p))
        else:
            raise VolumeError(f"{label}: {p.name} not found")
    if not files:
        raise VolumeError(f"{label}: no files")
    return files


def _floats(value: Any, n: int) -> np.ndarray | None:
    try:
        out = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.isfinite(out).all() else None


def _slices(heads: list[tuple[str, Any]], label: str, info: VolumeInfo, budget: DecodeBudget) -> list[_Slice]:
    out: list[_Slice] = []
    for f, ds in heads:
        kinds = [str(k).upper() for k in (ds.get("ImageType") or [])]
        if LOCALIZER in kinds:
            info.localizers_dropped += 1
            continue
        rows, cols = as_int(ds.get("Rows")), as_int(ds.get("Columns"))
        frames = as_int(ds.get("NumberOfFrames"), 1)
        bps = max(1, (as_int(ds.get("BitsAllocated"), 16) + 7) // 8)
        samples = as_int(ds.get("SamplesPerPixel"), 1)
        if rows < 2 or cols < 2 or samples != 1:
            raise VolumeError(f"{label}: {os.path.basename(f)}: {rows}x{cols}x{samples} samples is not a CT slice")
        if frames > 1:  # checked before the per-frame groups are walked (a 4096-frame header stops here)
            _check(_budget.Declared(cols, rows, frames, 1, bps), label, budget)
            out.extend(_frames(f, ds, rows, cols, bps, frames, label))
            info.multiframe = True
            continue
        ipp = _floats(ds.get("ImagePositionPatient"), 3)
        iop = _floats(ds.get("ImageOrientationPatient"), 6)
        ps = _floats(ds.get("PixelSpacing"), 2)
        if ipp is None or iop is None:
            raise VolumeError(f"{label}: {os.path.basename(f)} has no usable ImagePositionPatient/"
                              "ImageOrientationPatient; slices are never ordered by InstanceNumber, so it "
                              "cannot be placed in the volume")
        if ps is None or (ps <= 0).any():
            raise VolumeError(f"{label}: {os.path.basename(f)} has no usable PixelSpacing")
        out.append(_Slice(f, None, ipp, iop, (float(ps[0]), float(ps[1])), rows, cols, bps,
                          as_int(ds.get("InstanceNumber"), 0)))
    if len(out) < MIN_SLICES:
        raise VolumeError(f"{label}: {len(out)} image slice(s); a volume needs at least {MIN_SLICES}")
    sig = Counter((s.rows, s.cols, s.pixel_spacing, tuple(np.round(s.orientation, 3))) for s in out)
    if len(sig) > 1:
        raise VolumeError(f"{label}: slices of one series differ in size, pixel spacing or orientation "
                          f"({len(sig)} kinds: {', '.join(str(n) for n in sig.values())} slices); not one volume")
    s0 = out[0]
    _check(_budget.Declared(s0.cols, s0.rows, len(out), 1, s0.bytes_per_sample), label, budget)
    return out


def _check(declared: _budget.Declared, label: str, budget: DecodeBudget) -> None:
    try:
        _budget.check(declared, label, budget)
    except BudgetExceeded as exc:
        raise ImageTooLarge(f"{exc} (CT volume)") from exc


def _frames(f: str, ds: Any, rows: int, cols: int, bps: int, frames: int, label: str) -> list[_Slice]:
    """Frames of an enhanced (multi-frame) CT placed by their functional groups."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    if per is None or len(per) != frames:
        raise VolumeError(f"{label}: multi-frame object with {frames} frames but no per-frame plane positions "
                          "(PerFrameFunctionalGroupsSequence); its frames cannot be placed in 3D")

    def group(item: Any, seq: str, attr: str) -> Any:
        for src in (item, shared):
            if src is not None and seq in src and len(src[seq].value) and attr in src[seq].value[0]:
                return src[seq].value[0].get(attr)
        return None

    out = []
    for i, item in enumerate(per):
        ipp = _floats(group(item, "PlanePositionSequence", "ImagePositionPatient"), 3)
        iop = _floats(group(item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        ps = _floats(group(item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        if ipp is None or iop is None or ps is None or (ps <= 0).any():
            raise VolumeError(f"{label}: frame {i + 1} of a multi-frame object lacks its plane position, "
                              "orientation or pixel spacing; its frames cannot be placed in 3D")
        slope = group(item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = group(item, "PixelValueTransformationSequence", "RescaleIntercept")
        rescale = (float(slope) if slope is not None else 1.0, float(intercept) if intercept is not None else 0.0)
        out.append(_Slice(f, i, ipp, iop, (float(ps[0]), float(ps[1])), rows, cols, bps, i + 1, rescale))
    return out


# ---- geometry ----------------------------------------------------------------------------------
def _normal(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, c = iop[:3], iop[3:]
    n = np.cross(r, c)
    if np.linalg.norm(n) < 0.5 or abs(float(r @ c)) > 0.01:
        raise VolumeError("ImageOrientationPatient is not two orthogonal unit directions")
    return r / np.linalg.norm(r), c / np.linalg.norm(c), n / np.linalg.norm(n)


def _order(slices: list[_Slice], label: str, info: VolumeInfo, grid: CTGrid) -> tuple[list[_Slice], np.ndarray]:
    try:
        _, _, n = _normal(slices[0].orientation)
    except VolumeError as exc:
        raise VolumeError(f"{label}: {exc}") from exc
    pos = np.array([s.position @ n for s in slices])
    order = sorted(range(len(slices)), key=lambda i: (pos[i], slices[i].instance))
    slices, pos = [slices[i] for i in order], pos[order]
    keep = np.concatenate([[True], np.diff(pos) > 1e-3])
    info.duplicates_dropped = int((~keep).sum())
    if info.duplicates_dropped:
        info.notes.append(f"{info.duplicates_dropped} slice(s) at an already occupied position dropped "
                          "(first by InstanceNumber kept)")
    slices, pos = [s for s, k in zip(slices, keep, strict=True) if k], pos[keep]
    if len(slices) < MIN_SLICES:
        raise VolumeError(f"{label}: {len(slices)} distinct slice position(s); a volume needs at least {MIN_SLICES}")
    steps = np.diff(pos)
    median = float(np.median(steps))
    info.slice_step_range = (float(steps.min()), float(steps.max()))
    info.uneven = bool(steps.max() - steps.min() > 0.1 * median)
    wide = steps > 1.5 * median
    if (steps > grid.max_gap_mm).any():
        raise VolumeError(f"{label}: a gap of {steps.max():.1f} mm between neighbouring slices (median step "
                          f"{median:.2f} mm; more than {grid.max_gap_mm:g} mm): slices are missing; the series "
                          "is incomplete and is not filled in")
    info.gaps_filled = int(wide.sum())
    if info.gaps_filled:
        info.notes.append(f"{info.gaps_filled} gap(s) up to {steps.max():.1f} mm interpolated across")
    if info.uneven:
        info.notes.append(f"uneven slice steps {steps.min():.2f}-{steps.max():.2f} mm resampled on real positions")
    s0 = slices[0]
    info.slices, info.source_shape = len(slices), (s0.rows, s0.cols)
    info.source_spacing = (s0.pixel_spacing[0], s0.pixel_spacing[1], median)
    return slices, pos


def _axis_weights(src: np.ndarray, dst: np.ndarray, half: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation from ascending sample coordinates ``src`` to ``dst``: (i0, weight of
    i0 + 1, inside); ``dst`` within ``half`` of the end samples counts as inside (a voxel's extent)."""
    i0 = np.clip(np.searchsorted(src, dst, side="right") - 1, 0, len(src) - 2)
    w = np.clip((dst - src[i0]) / (src[i0 + 1] - src[i0]), 0.0, 1.0)
    inside = (dst >= src[0] - half) & (dst <= src[-1] + half)
    return i0, w.astype(np.float32), inside


def _interp(a: np.ndarray, axis: int, weights: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    i0, w, inside = weights
    shape = [1] * a.ndim
    shape[axis] = len(w)
    w_ = w.reshape(shape)
    out: np.ndarray = np.take(a, i0, axis=axis) * (1.0 - w_) + np.take(a, i0 + 1, axis=axis) * w_
    if not inside.all():
        idx = [slice(None)] * a.ndim
        idx[axis] = ~inside  # type: ignore[call-overload]
        out[tuple(idx)] = AIR_HU
    return out


def _target(centre: float, n: int, step: float) -> np.ndarray:
    return centre + (np.arange(n) - (n - 1) / 2.0) * step


def _resample(slices: list[_Slice], pos: np.ndarray, grid: CTGrid, label: str, info: VolumeInfo,
              budget: DecodeBudget, wait: float | None) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    s0 = slices[0]
    r, c, n = _normal(s0.orientation)
    # array axes of the stack (slice, row, column) and their directions in patient space
    dirs = [n, c, r]
    ras = [d * LPS_TO_RAS for d in dirs]
    world = [int(np.abs(d).argmax()) for d in ras]
    if sorted(world) != [0, 1, 2]:
        raise VolumeError(f"{label}: orientation too oblique to map onto RAS axes")
    info.oblique_deg = max(math.degrees(math.acos(min(1.0, abs(float(d[w]))))) for d, w in zip(ras, world, strict=True))
    if info.oblique_deg > MAX_OBLIQUE_DEG:
        raise VolumeError(f"{label}: oblique acquisition ({info.oblique_deg:.0f} degrees from the RAS axes, more than "
                          f"{MAX_OBLIQUE_DEG:g}); resampling oblique series is not implemented")
    if info.oblique_deg > 1.0:
        info.notes.append(f"oblique by {info.oblique_deg:.1f} degrees: placed on the nearest RAS axes")
    # in-plane offsets of each slice's origin from the first one's (gantry tilt shears them)
    off = np.array([[(s.position - s0.position) @ c, (s.position - s0.position) @ r] for s in slices])
    reach = np.hypot(off[:, 0], off[:, 1])
    depth = np.maximum(np.abs(pos - pos[0]), 1e-6)
    info.tilt_deg = float(np.degrees(np.arctan((reach / depth).max()))) if len(slices) > 1 else 0.0
    if info.tilt_deg > MAX_TILT_DEG:
        raise VolumeError(f"{label}: slice positions sheared by {info.tilt_deg:.0f} degrees (gantry tilt over "
                          f"{MAX_TILT_DEG:g}); not corrected")
    if info.tilt_deg > 0.1:
        info.notes.append(f"gantry tilt {info.tilt_deg:.1f} degrees corrected (slices shifted in-plane)")
    ps_row, ps_col = s0.pixel_spacing
    extent = [pos[-1] - pos[0], (s0.rows - 1) * ps_row, (s0.cols - 1) * ps_col]
    centre = [(pos[0] + pos[-1]) / 2, off[:, 0].mean() + extent[1] / 2, off[:, 1].mean() + extent[2] / 2]
    sizes, steps = [], []
    for a in range(3):
        step = grid.spacing[world[a]]
        if world[a] == 2:
            valid_n = int(math.floor(extent[a] / step)) + 1
            m = grid.z_multiple
            count = min(grid.max_z, max(m, int(math.ceil(valid_n / m)) * m))
        else:
            count = grid.shape_xy[world[a]]
        sizes.append(count)
        steps.append(step)
    work = 4 * sizes[1] * sizes[2] * (len(slices) + 2 * sizes[0]) + 24 * s0.rows * s0.cols
    t_row, t_col = _target(centre[1], sizes[1], steps[1]), _target(centre[2], sizes[2], steps[2])
    try:
        with _budget.reserve_bytes(work, label, wait):
            stack = np.empty((len(slices), sizes[1], sizes[2]), np.float32)
            inplane = np.ones((len(slices), sizes[1], sizes[2]), bool)
            good = np.ones(len(slices), bool)
            for k, s in enumerate(slices):
                try:
                    hu = _decode(s, label)
                except ImageTooLarge:
                    raise
                except VolumeError as exc:  # a damaged slice is a missing one (real archives have them)
                    good[k] = False
                    info.notes.append(f"unreadable slice dropped ({str(exc).rsplit(': ', 1)[-1][:120]})")
                    continue
                src_row = off[k, 0] + np.arange(s0.rows) * ps_row
                src_col = off[k, 1] + np.arange(s0.cols) * ps_col
                wr, wc = _axis_weights(src_row, t_row, ps_row / 2), _axis_weights(src_col, t_col, ps_col / 2)
                stack[k] = _interp(_interp(hu, 0, wr), 1, wc)
                inplane[k] = wr[2][:, None] & wc[2][None, :]
            median = info.source_spacing[2]
            if not good.all():
                info.corrupt_dropped = int((~good).sum())
                stack, inplane, pos = stack[good], inplane[good], pos[good]
                if len(pos) < MIN_SLICES:
                    raise VolumeError(f"{label}: {len(pos)} readable slice(s); a volume needs at least {MIN_SLICES}")
                if np.diff(pos).max() > grid.max_gap_mm:
                    raise VolumeError(f"{label}: unreadable slices leave a gap of {np.diff(pos).max():.1f} mm (more "
                                      f"than {grid.max_gap_mm:g} mm); the series is incomplete and is not filled in")
                info.slices = len(pos)
            wz = _axis_weights(pos, _target(centre[0], sizes[0], steps[0]), median / 2)
            vol = _interp(stack, 0, wz)
            del stack
            valid = np.take(inplane, wz[0], axis=0) & wz[2][:, None, None]
    except BudgetExceeded as exc:
        raise ImageTooLarge(str(exc)) from exc
    # stack axes (slice, row, column) -> RAS [x, y, z], flipping axes that run against RAS
    perm = [world.index(w) for w in range(3)]
    vol, valid = np.transpose(vol, perm), np.transpose(valid, perm)
    for w in range(3):
        if ras[perm[w]][w] < 0:
            vol, valid = np.flip(vol, axis=w), np.flip(valid, axis=w)
    spacing = (grid.spacing[0], grid.spacing[1], grid.spacing[2])
    return np.ascontiguousarray(vol, dtype=np.float32), np.ascontiguousarray(valid), spacing


# ---- pixels ------------------------------------------------------------------------------------
def _decode(s: _Slice, label: str) -> np.ndarray:
    """One slice (or frame) in HU, float32 (rows, cols); the file's codestream checked first."""
    name = os.path.basename(s.path)
    try:
        ds = _dcmread(s.path, stop_before_pixels=False, label=name)
        if s.frame is None:
            _check(_budget.dicom_size(ds), f"{label}: {name}", _budget.DEFAULT)
        from pydicom.pixels import apply_modality_lut, pixel_array

        if s.frame is None:
            arr = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        else:
            slope, intercept = s.rescale or (1.0, 0.0)
            arr = np.asarray(pixel_array(ds, index=s.frame), dtype=np.float32) * slope + intercept
    except ImageLoadError:
        raise
    except DicomDecodeError as exc:
        raise VolumeError(f"{label}: {exc}") from exc
    except Exception as exc:  # pydicom raises many types for bad or unsupported encodings
        raise VolumeError(f"{label}: {name}: cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
    if arr.shape != (s.rows, s.cols):
        raise VolumeError(f"{label}: {name}: decoded {arr.shape}, header says {s.rows}x{s.cols}")
    # below air is padding (PixelPaddingValue, the outside of the reconstruction circle: -2000, -3024)
    out: np.ndarray = np.maximum(arr, AIR_HU)
    return out
