"""``pixels``: downsampled raw pixels, the weight-free baseline (and the default demo encoder).

Why ship it: every retrieval claim needs a floor to beat ("raw-pixel kNN"), and a fresh machine
with no weights must still build and search a real index end to end. Anatomy conditioning is a
crop of the anatomy's region on a frontal chest view (``box`` in the taxonomy) before
downsampling: "similar left lung" compares left-lung regions. It is only meaningful for frontal
chest radiographs; for other images it is still deterministic, just not anatomical.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.encoders.base import l2_normalise
from retrieval.encoders.preprocess import crop_box, resize
from retrieval.taxonomy import Taxonomy, default_taxonomy


class PixelEncoder:
    name = "pixels"

    def __init__(self, size: int = 32, taxonomy: Taxonomy | None = None) -> None:
        if size < 4 or size > 256:
            raise ValueError("pixels encoder size must be in [4, 256]")
        self.size = size
        self.dim = size * size
        self.tax = taxonomy or default_taxonomy()

    def supports_anatomy(self, anatomy: str) -> bool:
        return self.tax.anatomy(anatomy).name != "chest"

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        box = self.tax.anatomy(anatomy).box if anatomy else None
        rows = []
        for img in images:
            region = crop_box(img, box) if box else img
            v = resize(region, self.size).ravel().astype(np.float32)
            v = v - v.mean()  # brightness-invariant: compare structure, not exposure
            rows.append(v)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return l2_normalise(np.stack(rows))

    def describe(self) -> dict[str, object]:
        return {"family": self.name, "size": self.size, "dim": self.dim}
