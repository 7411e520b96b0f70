"""Report drafting with retrieved context: context builder, generators, citations."""

from retrieval.rag.context import ContextBuilder
from retrieval.rag.extractive import ExtractiveGenerator, copy_nearest
from retrieval.rag.types import DISCLAIMER, Draft, DraftContext, DraftSentence

__all__ = ["DISCLAIMER", "ContextBuilder", "Draft", "DraftContext", "DraftSentence", "ExtractiveGenerator",
           "copy_nearest", "create_generator"]


def create_generator(kind: str, **kw):
    """``extractive`` | ``vlm`` (model_dir=...) | ``http`` (base_url=..., model=...)."""
    if kind == "extractive":
        return ExtractiveGenerator()
    if kind == "vlm":
        from retrieval.rag.vlm import TransformersVLMGenerator

        return TransformersVLMGenerator(kw["model_dir"], device=kw.get("device", "cpu"))
    if kind == "http":
        from retrieval.rag.http import OpenAICompatibleGenerator

        return OpenAICompatibleGenerator(kw["base_url"], kw["model"], api_key=kw.get("api_key"),
                                         timeout=kw.get("timeout", 120.0))
    raise ValueError(f"unknown generator {kind!r} (extractive, vlm, http)")
