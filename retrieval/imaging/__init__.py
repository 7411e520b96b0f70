"""Image decoding and image references: what both the query path and the offline builds need.

Everything becomes float32 (H, W) grayscale in [0, 1] (:func:`load_image`), from PNG, JPEG or
DICOM, sniffed by content. :func:`resolve_image` is the one guarded path resolver.
"""

from retrieval.imaging.images import ImageLoadError, load_image, pixel_key, sniff
from retrieval.imaging.paths import ImagePathError, manifest_image, resolve_image

__all__ = ["ImageLoadError", "ImagePathError", "load_image", "manifest_image", "pixel_key", "resolve_image", "sniff"]
