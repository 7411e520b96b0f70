"""Draft a report for a query study: retrieve analog cases, build the context, generate."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from retrieval.rag.context import ContextBuilder
from retrieval.rag.types import Draft, DraftImages, Generator
from retrieval.search import CaseHit, Query, Searcher


def draft_report(searcher: Searcher, images: Sequence[np.ndarray], generator: Generator, q: Query,
                 prior_images: Sequence[np.ndarray] = (), prior_report: str | None = None,
                 prior_study_id: str = "prior", prior_date: str | None = None,
                 token_budget: int = 1500, reference_images: int = 3) -> Draft:
    """Retrieve the top ``q.k`` cases with reports for ``images`` and draft from them.

    The prior study (when it is in the index too) is excluded from the analog cases: it is the
    comparison, not evidence about how the current image reads.
    """
    if prior_study_id != "prior" and not q.exclude_study_id:
        from dataclasses import replace

        q = replace(q, exclude_study_id=prior_study_id)
    res = searcher.reports_by_image(list(images), q)
    ctx = ContextBuilder(token_budget).build(
        [(h.study_id, h.score, h.report) for h in res.hits],
        prior=(prior_study_id, prior_report, prior_date) if prior_report else None,
        anatomy=q.anatomy, finding=q.finding)
    refs = []
    if getattr(generator, "name", "") != "extractive" and reference_images:
        refs = _reference_images(searcher, res.hits, reference_images)
    return generator.generate(ctx, DraftImages(list(images), list(prior_images), refs))


def _reference_images(searcher: Searcher, hits: Sequence[CaseHit], limit: int) -> list[tuple[str, np.ndarray]]:
    from retrieval.imaging.images import ImageLoadError, load_image
    from retrieval.imaging.paths import ImagePathError, resolve_image

    root = searcher.index.meta.image_root
    out: list[tuple[str, np.ndarray]] = []
    for h in hits:
        if len(out) >= limit or not h.image:
            continue
        try:
            out.append((h.study_id, load_image(resolve_image(h.image, root))))  # guarded like every reader
        except (ImageLoadError, ImagePathError):
            continue
    return out
