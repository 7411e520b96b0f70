"""Anatomical regions of a frontal chest radiograph derived from a lung mask.

Why: "similar heart" is only trustworthy if the heart query looked at the heart. A lung
segmentation mask (255 = lung) is the one region ground truth the shared data has; everything
else is derived from it by fixed rules written down from ordinary chest anatomy, not fitted to
any data:

* **right / left lung**: the mask split at the column of least lung between the two lungs (the
  lowest column sum in the middle 40 % of the mask's width). The patient's right lung is on the
  image's *left* (frontal display convention).
* **heart**: between the two lungs in their lower part: every row from the middle of the lungs'
  height (``HEART_TOP`` of the way from the lungs' top to their lowest row) down to the higher of
  the two lungs' lowest rows, the columns strictly between the right lung's medial (image-right)
  edge and the left lung's medial (image-left) edge in that row. Where one lung has no pixel in a
  row, its last medial edge above is carried down.
* **mediastinum**: the same gap between the lungs above the heart rows.
* **pleura**: a band ``PLEURA_BAND`` x the lungs' width either side of the lung margins
  (lateral, apical and basal; the medial margins facing the heart and mediastinum are left out,
  those pixels count as heart / mediastinum), plus a disk of twice that radius at each
  costophrenic angle (each lung's lowest lateral corner: the pixel with the largest
  row + lateral offset), never below the
  mask's lower edge.
* **abdomen**: every row below the mask's lowest lung row (the lower edge the mask ends at).
* **outside body**: columns more than ``BODY_MARGIN`` x the lungs' width lateral to the lungs
  (chest wall, ribs and soft tissue lie within that margin); the whole height.

:func:`cell_fractions` turns a region into the share of each patch-grid cell it covers; the
encoders resize images to a square without keeping the aspect, so cell (i, j) covers rows
``i*H/g .. (i+1)*H/g`` and columns ``j*W/g .. (j+1)*W/g`` of the original image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

HEART_TOP = 0.5  # heart rows start this far down the lungs' height
PLEURA_BAND = 0.03  # half-width of the pleural band, as a share of the lungs' width
BODY_MARGIN = 0.12  # body extends this share of the lungs' width lateral to them
REGIONS = ("right lung", "left lung", "lung", "heart", "mediastinum", "pleura", "abdomen", "outside body")


class MaskError(ValueError):
    """A mask that cannot give regions (empty, of another size than its image)."""


@dataclass(frozen=True)
class LungRegions:
    """Boolean (H, W) maps of each region (:data:`REGIONS`)."""

    maps: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.maps[name]


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary dilation with a (2r+1) square (PIL's max filter; no scipy needed)."""
    from PIL import Image, ImageFilter

    if radius <= 0:
        return mask.copy()
    im = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").filter(ImageFilter.MaxFilter(2 * radius + 1))
    return np.asarray(im) > 127


def _disk(shape: tuple[int, int], cy: int, cx: int, r: int) -> np.ndarray:
    ys, xs = np.ogrid[: shape[0], : shape[1]]
    return np.asarray((ys - cy) ** 2 + (xs - cx) ** 2 <= r * r)


def lung_regions(mask: np.ndarray) -> LungRegions:
    """The regions of one frontal radiograph from its lung mask ((H, W), lung > 127 or True)."""
    lung = np.asarray(mask) > 127 if np.asarray(mask).dtype != bool else np.asarray(mask)
    if lung.ndim != 2:
        raise MaskError(f"a lung mask is a 2-D grayscale image, got shape {lung.shape}")
    h, w = lung.shape
    rows, cols = np.nonzero(lung)
    if len(rows) < 50:
        raise MaskError("the lung mask is (almost) empty")
    x0, x1 = int(cols.min()), int(cols.max())
    y0, y1 = int(rows.min()), int(rows.max())
    width = x1 - x0 + 1
    colsum = lung.sum(0)
    lo, hi = x0 + int(0.3 * width), x0 + int(0.7 * width) + 1
    split = lo + int(np.argmin(colsum[lo:hi]))
    right = lung.copy()
    right[:, split:] = False  # patient's right = image left
    left = lung.copy()
    left[:, :split] = False
    if not right.any() or not left.any():
        raise MaskError("the lung mask does not show two lungs")
    heart = np.zeros_like(lung)
    mediastinum = np.zeros_like(lung)
    bottom = min(int(np.nonzero(right.any(1))[0].max()), int(np.nonzero(left.any(1))[0].max()))
    heart_top = y0 + int(round(HEART_TOP * (y1 - y0)))
    med_r, med_l = None, None
    for r in range(y0, bottom + 1):
        rr, ll = np.flatnonzero(right[r]), np.flatnonzero(left[r])
        if len(rr):
            med_r = int(rr.max())
        if len(ll):
            med_l = int(ll.min())
        if med_r is None or med_l is None or med_l - med_r < 2:
            continue
        (heart if r >= heart_top else mediastinum)[r, med_r + 1:med_l] = True
    band = max(1, int(round(PLEURA_BAND * width)))
    pleura = _dilate(lung, band) & _dilate(~lung, band)  # within `band` of the lung margin
    for side, image_left in ((right, True), (left, False)):  # costophrenic angles
        rs, cs = np.nonzero(side)
        k = int(np.argmax(rs - cs if image_left else rs + cs))  # the lowest, most lateral corner
        pleura |= _disk(lung.shape, int(rs[k]), int(cs[k]), 2 * band)
    pleura &= ~(heart | mediastinum)
    pleura[y1 + 1:] = False
    abdomen = np.zeros_like(lung)
    abdomen[y1 + 1:] = True
    margin = int(round(BODY_MARGIN * width))
    outside = np.zeros_like(lung)
    outside[:, : max(0, x0 - margin)] = True
    outside[:, min(w, x1 + margin + 1):] = True
    return LungRegions({"right lung": right, "left lung": left, "lung": lung, "heart": heart,
                        "mediastinum": mediastinum, "pleura": pleura, "abdomen": abdomen, "outside body": outside})


def cell_fractions(region: np.ndarray, grid: int) -> np.ndarray:
    """(grid, grid): the share of each patch-grid cell's pixels inside ``region`` (H, W)."""
    h, w = region.shape
    ys = np.round(np.linspace(0, h, grid + 1)).astype(int)
    xs = np.round(np.linspace(0, w, grid + 1)).astype(int)
    sums = np.add.reduceat(np.add.reduceat(region.astype(np.float64), ys[:-1], axis=0), xs[:-1], axis=1)
    areas = np.outer(np.diff(ys), np.diff(xs)).astype(np.float64)
    return np.asarray(sums / np.maximum(areas, 1.0))


def attention_share(att: np.ndarray, fractions: np.ndarray) -> float:
    """Share of a (g, g) attention map in a region given by its cell fractions: each cell's
    attention is spread evenly over the cell's pixels (no smoothing across cells)."""
    return float((np.asarray(att, np.float64) * fractions).sum() / max(float(np.sum(att)), 1e-12))
