"""``open_clip``: an OpenCLIP model from a local directory (``open_clip_config.json`` + weights).

The directory layout is the one OpenCLIP publishes on model hubs, loaded through OpenCLIP's own
``local-dir:`` path, so a checkpoint downloaded once by a user (PMC-CLIP, BiomedCLIP-style
OpenCLIP exports, a fine-tune) works without a network. Weights must be present: OpenCLIP would
only warn and return a random model, which medrag refuses.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval._compat import ensure_torchvision
from retrieval.encoders.base import EncoderError, l2_normalise
from retrieval.encoders.hf import _torch_device
from retrieval.encoders.preprocess import to_uint8_rgb

_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin")


class OpenClipEncoder:
    name = "open_clip"

    def __init__(self, checkpoint: str | Path | None, device: str = "cpu") -> None:
        if checkpoint is None:
            raise EncoderError("open_clip needs checkpoint=<directory with open_clip_config.json>")
        path = Path(checkpoint)
        if not (path / "open_clip_config.json").is_file():
            raise EncoderError(f"open_clip: {path} has no open_clip_config.json")
        if not any((path / w).is_file() for w in _WEIGHT_FILES):
            raise EncoderError(f"open_clip: no weights in {path} (looked for {', '.join(_WEIGHT_FILES)})")
        ensure_torchvision()
        import open_clip

        self.path = path
        self.device = _torch_device(device)
        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{path}", device=self.device)
        self.model = model.eval()
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        self.dim = int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.encode_texts(["x"]).shape[1])

    def supports_anatomy(self, anatomy: str) -> bool:
        return False

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        import torch

        if anatomy:
            raise EncoderError("open_clip encoders are not anatomy-conditioned")
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.stack([self.preprocess(to_uint8_rgb(i)) for i in images]).to(self.device)
        with torch.inference_mode():
            feats = self.model.encode_image(batch)
        return l2_normalise(feats.float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, getattr(self, "dim", 0)), dtype=np.float32)
        with torch.inference_mode():
            feats = self.model.encode_text(self.tokenizer(list(texts)).to(self.device))
        return l2_normalise(feats.float().cpu().numpy())

    def describe(self) -> dict[str, object]:
        return {"family": self.name, "checkpoint": str(self.path), "dim": self.dim, "joint": True}


def create_open_clip(checkpoint: str | Path | None = None, device: str = "cpu", **_: object) -> OpenClipEncoder:
    return OpenClipEncoder(checkpoint, device)
