"""Image and text encoders behind one registry (see :mod:`retrieval.encoders.registry`)."""

from retrieval.encoders.base import EncoderError, ImageEncoder, TextEncoder, is_joint
from retrieval.encoders.registry import create_encoder, encoder_from_description, list_encoders

__all__ = ["EncoderError", "ImageEncoder", "TextEncoder", "create_encoder",
           "encoder_from_description", "is_joint", "list_encoders"]
