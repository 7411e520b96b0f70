"""Attention heat-maps over radiographs: where a conditioned query looked.

Why: a "similar left lung" hit is only trustworthy if the left-lung query looked at the left lung.
The overlay is the evidence a radiologist can check at a glance (CLI PNGs, the web page), and
:func:`mass_inside` is the same evidence as a number (share of attention inside a box).
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def upsample(att: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A (g, g) attention grid stretched to an image's (H, W), bilinear, still summing to 1."""
    from PIL import Image

    im = Image.fromarray(np.asarray(att, dtype=np.float32), mode="F")
    up = np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BILINEAR), dtype=np.float64)
    up = np.clip(up, 0, None)
    return (up / up.sum()) if up.sum() > 0 else np.full(shape, 1.0 / (shape[0] * shape[1]))


def overlay_png(image: np.ndarray, att: np.ndarray, max_side: int = 512, alpha: float = 0.45,
                legend: bool = True, title: str | None = None) -> bytes:
    """The grayscale image with the attention as a red-yellow heat layer, as PNG bytes; with a
    colour legend strip below it (the colour scale, from no attention to the most-attended
    patch, and that patch's share of the query's attention) and an optional title."""
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
    pic = Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), mode="RGB")
    if legend:
        pic = _with_legend(pic, float(np.max(att)) / max(float(np.sum(att)), 1e-12), alpha, title)
    buf = io.BytesIO()
    pic.save(buf, format="PNG")
    return buf.getvalue()


def _with_legend(pic: Any, peak: float, alpha: float, title: str | None) -> Any:
    """``pic`` with a strip below: the heat colours over mid-grey from 0 to the peak, labelled."""
    from PIL import Image, ImageDraw

    w, h = pic.size
    bar_h, text_h = max(8, h // 40), 12
    strip_h = bar_h + 2 * text_h + 6 + (text_h if title else 0)
    canvas = Image.new("RGB", (w, h + strip_h), (255, 255, 255))
    canvas.paste(pic, (0, 0))
    t = np.linspace(0.0, 1.0, max(2, w - 8))
    grey = 0.5
    row = np.stack([grey * (1 - alpha * t) + alpha * t, grey * (1 - alpha * t) + alpha * t * t,
                    grey * (1 - alpha * t)], -1)  # the overlay's colour at strength t over mid-grey
    bar = np.repeat((row[None] * 255 + 0.5).astype(np.uint8), bar_h, 0)
    y = h + 3 + (text_h if title else 0)
    canvas.paste(Image.fromarray(bar, mode="RGB"), (4, y))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, h + 1), title, fill=(0, 0, 0))
    draw.text((4, y + bar_h + 1), "0", fill=(0, 0, 0))
    peak_label = f"{peak:.0%} per patch"
    draw.text((max(4, w - 4 - 6 * len(peak_label)), y + bar_h + 1), peak_label, fill=(0, 0, 0))
    draw.text((4, y + bar_h + 1 + text_h), "attention (colour: share of the query's attention)", fill=(0, 0, 0))
    return canvas


def mass_inside(att: np.ndarray, shape: tuple[int, int], box: tuple[float, float, float, float]) -> float:
    """Share of the attention (upsampled to ``shape``) inside box ``(x, y, w, h)`` in pixels."""
    heat = upsample(att, shape)
    x, y, bw, bh = (int(round(v)) for v in box)
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(shape[1], x + bw), min(shape[0], y + bh)
    return float(heat[y0:y1, x0:x1].sum()) if x1 > x0 and y1 > y0 else 0.0
