"""Encoder protocols: what the indexer and search may rely on, whatever the model family.

Images arrive as float32 (H, W) grayscale arrays in [0, 1] (see ``retrieval.imaging.images``); every
encoder returns float32 rows that are L2-normalised, so inner product is cosine similarity in
every index backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeGuard, runtime_checkable

import numpy as np


class EncoderError(RuntimeError):
    """An encoder that cannot be created or cannot do what was asked (clear, user-facing)."""


@runtime_checkable
class ImageEncoder(Protocol):
    name: str  # registry family, e.g. "medrag-native"
    dim: int

    def encode_images(self, images: Sequence[np.ndarray], anatomy: str | None = None) -> np.ndarray:
        """(n, dim) float32, L2-normalised; ``anatomy`` conditions the embedding when supported."""
        ...

    def supports_anatomy(self, anatomy: str) -> bool:
        """Whether ``encode_images(..., anatomy=anatomy)`` gives a conditioned embedding."""
        ...

    def describe(self) -> dict[str, object]:
        """Name, checkpoint and settings, recorded in every index built with it."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    name: str
    dim: int

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """(n, dim) float32, L2-normalised."""
        ...

    def describe(self) -> dict[str, object]: ...


@runtime_checkable
class FindingQueries(Protocol):
    """An image encoder whose vectors carry its own reading of named findings (a label probe), so
    a query can *ask* for a finding: "cases that look like this one and show cardiomegaly", on
    studies that have no report to filter by."""

    def finding_space(self, finding: str) -> str | None:
        """The anatomy whose conditioned space reads ``finding`` (None: the whole image)."""
        ...

    def assert_finding(self, vectors: np.ndarray, anatomy: str | None, finding: str) -> np.ndarray:
        """Query vectors of ``anatomy``'s space changed to state ``finding`` present (and the case
        not normal); rows stay L2-normalised. Raises EncoderError if that space cannot read it."""
        ...


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    out: np.ndarray = x / np.maximum(norms, 1e-12)
    return out


@runtime_checkable
class JointEncoder(ImageEncoder, TextEncoder, Protocol):
    """Images and texts into one space (CLIP-style): text->image search."""


def is_joint(encoder: object) -> TypeGuard[JointEncoder]:
    """True when one object embeds images and texts into the same space (CLIP-style)."""
    return isinstance(encoder, ImageEncoder) and isinstance(encoder, TextEncoder)
