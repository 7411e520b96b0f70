"""Report text as a retrieval signal: the anatomy-restricted text and its MiniLM embedding.

Used as the text oracle in evaluation (how well would a perfect report search do?) and as the
text tower's target in training; one implementation keeps the two the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from retrieval.entities import EntityExtractor
from retrieval.metrics import Embedder
from retrieval.similarity import relevant_anatomies
from retrieval.taxonomy import default_taxonomy


def setting_texts(reports: Sequence[str | None]) -> Callable[[str | None], list[str]]:
    """setting -> each report's text, restricted to its sentences about the anatomy when conditioned."""
    ex = EntityExtractor()
    tax = default_taxonomy()

    def texts(setting: str | None) -> list[str]:
        rel = relevant_anatomies(tax.anatomy(setting).name, tax) if setting else None
        out = []
        for r in reports:
            if rel is None or not r:
                out.append(r or "")
                continue
            kept = [s.text for s, ents in ex.sentence_entities(r) if any(e.anatomy in rel for e in ents)]
            out.append(" ".join(kept) if kept else "")
        return out

    return texts


def text_oracle(reports: Sequence[str | None], device: str = "cpu") -> Embedder:
    """MiniLM embedding of each report (of its sentences about the anatomy, when conditioned)."""
    from retrieval.encoders import create_encoder

    enc = create_encoder("minilm", device=device)
    texts_for = setting_texts(reports)
    cache: dict[str | None, np.ndarray] = {}

    def embed(setting: str | None) -> np.ndarray:
        if setting not in cache:
            texts = texts_for(setting)
            out = np.zeros((len(texts), enc.dim), np.float32)
            for i in range(0, len(texts), 64):
                out[i:i + 64] = enc.encode_texts(texts[i:i + 64])
            cache[setting] = out
        return cache[setting]

    return embed


