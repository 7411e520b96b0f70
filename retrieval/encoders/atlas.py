"""Where each anatomy lies on a frontal chest radiograph: a coarse atlas that biases the anatomy
head's attention (``NativeConfig.spatial_prior``).

Why: label supervision carries no side (NIH's "Effusion" does not say which), so nothing taught
the "left lung" query to look at the left lung; on the notes set's radiologist-drawn lung boxes
the learned left-lung query looked *more* at the right lung. What fixes laterality here is the
display convention of a frontal (PA/AP) radiograph, the anatomical position: the patient's left
is on the image's right. Images are never flipped (augmentation included), so the convention
holds for every image the head sees.

The boxes are coarse fractions of the image written down from that convention and ordinary
chest anatomy, not fitted to any data (in particular not to the notes set's boxes, which measure
the result). The bias is 0 inside an anatomy's box and falls linearly to ``-strength`` at
``MARGIN`` outside it, added to the attention logits: the query can still look outside its box,
at a cost. An anatomy without a box uses its nearest ancestor's ("right pleura" -> none; "left
lower lobe" has its own); the whole image, "lung", "pleura", "bones" and other bilateral or
diffuse anatomies get no bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.taxonomy import default_taxonomy

# (x0, x1, y0, y1) as fractions of width and height; x grows to the image's right = the patient's left
BOXES: dict[str, tuple[float, float, float, float]] = {
    "right lung": (0.08, 0.52, 0.08, 0.88),
    "left lung": (0.48, 0.92, 0.08, 0.88),
    "right upper lobe": (0.08, 0.52, 0.08, 0.45),
    "right middle lobe": (0.08, 0.50, 0.40, 0.68),
    "right lower lobe": (0.08, 0.52, 0.55, 0.90),
    "left upper lobe": (0.48, 0.92, 0.08, 0.58),
    "left lower lobe": (0.48, 0.92, 0.50, 0.90),
    "right hemidiaphragm": (0.08, 0.52, 0.70, 0.98),
    "left hemidiaphragm": (0.48, 0.92, 0.70, 0.98),
    "heart": (0.35, 0.80, 0.45, 0.88),
    "mediastinum": (0.35, 0.65, 0.05, 0.65),
}
MARGIN = 0.08


def box_for(anatomy: str) -> tuple[float, float, float, float] | None:
    """The anatomy's atlas box, or its nearest ancestor's; None for the whole image."""
    tax = default_taxonomy()
    if anatomy not in tax.anatomies:
        return None
    for name in tax.ancestors(anatomy):  # itself first, then upwards
        if name in BOXES:
            return BOXES[name]
    return None


def atlas_bias(anatomies: Sequence[str], grid: int, strength: float) -> np.ndarray:
    """(len(anatomies), grid * grid) additive attention bias over a row-major patch grid."""
    centres = (np.arange(grid) + 0.5) / grid
    ys, xs = np.meshgrid(centres, centres, indexing="ij")
    out = np.zeros((len(anatomies), grid * grid), np.float32)
    if strength <= 0:
        return out
    for i, anatomy in enumerate(anatomies):
        box = box_for(anatomy)
        if box is None:
            continue
        x0, x1, y0, y1 = box
        dx = np.maximum(np.maximum(x0 - xs, xs - x1), 0.0)
        dy = np.maximum(np.maximum(y0 - ys, ys - y1), 0.0)
        outside = np.minimum(np.hypot(dx, dy) / MARGIN, 1.0)
        out[i] = (-strength * outside).reshape(-1)
    return out
