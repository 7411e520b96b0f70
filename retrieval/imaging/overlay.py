"""Attention heat-maps over radiographs: where a conditioned query looked.

Why: a "similar left lung" hit is only trustworthy if the left-lung query looked at the left lung.
The overlay is the evidence a radiologist can check at a glance (CLI PNGs, the web page), and
:func:`mass_inside` is the same evidence as a number (share of attention inside a box).
"""

from __future__ import annotations

import io

import numpy as np


def upsample(att: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (g, g) attention grid stretched to an image's (H, W), bilinear, still summing to 1."""
    from PIL import Image

    im = Image.fromarray(np.asarray(att, dtype=np.float32), mode="F")
    up = np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float64)
    up = np.clip(up, 0, None)
    return (up / up.sum()) if up.sum() > 0 else np.full(shape, 1.0 / (shape[0] * shape[1]))


def overlay_png(image: np.ndarray, att: np.ndarray, max_side: int = 512, alpha: float = 0.45) -> bytes:
    """The grayscale image with the attention as a red-yellow heat layer, as PNG bytes."""
    from PIL import Image

    img = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
    h, w = img.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        im = Image.fromarray(img, mode="F").resize((max(1, int(w * scale)), max(1, int(h * scale))),
                                                   Image.Resampling.BILINEAR)
        img = np.asarray(im, dtype=np.float32)
        h, w = img.shape
    heat = upsample(att, (h, w))
    heat = heat / heat.max() if heat.max() > 0 else heat
    base = np.stack([img] * 3, -1)
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], -1)  # red -> yellow with strength
    a = (alpha * heat)[..., None]
    out = (base * (1 - a) + colour * a) * 255.0
    buf = io.BytesIO()
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def mass_inside(att: np.ndarray, shape: tuple[int, int], box: tuple[float, float, float, float]) -> float:
    """Share of the attention (upsampled to ``shape``) inside box ``(x, y, w, h)`` in pixels."""
    heat = upsample(att, shape)
    x, y, bw, bh = (int(round(v)) for v in box)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(shape[1], x + bw), min(shape[0], y + bh)
    return float(heat[y0:y1, x0:x1].sum()) if x1 > x0 and y1 > y0 else 0.0
