"""Shared image preprocessing: resize, anatomy crops, tensor conversion."""

from __future__ import annotations

from typing import Any

import numpy as np


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square resize of a float (H, W) image; aspect is not kept (as in CXR training pipelines)."""
    from PIL import Image

    im = Image.fromarray(np.asarray(image, dtype=np.float32), mode="F")
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def crop_box(image: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Crop a normalised (x0, y0, x1, y1) box; never returns an empty array."""
    h, w = image.shape[:2]
    x0, y0, x1, y1 = box
    c0, c1 = int(round(x0 * w)), max(int(round(x1 * w)), int(round(x0 * w)) + 1)
    r0, r1 = int(round(y0 * h)), max(int(round(y1 * h)), int(round(y0 * h)) + 1)
    return image[r0:r1, c0:c1]


def to_uint8_rgb(image: np.ndarray) -> Any:  # -> PIL.Image.Image
    from PIL import Image

    arr = np.clip(np.asarray(image, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L").convert("RGB")
