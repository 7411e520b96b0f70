"""Draft a report for a query study: read the image, retrieve analog cases, build the findings
table, generate, check.

The order matters for safety. The findings table (:mod:`retrieval.rag.findings`) is built first,
from the query image's own calibrated reading and the analog cases' statements (presence only);
the structured drafter renders it; any other generator (the copy/edit drafters, a VLM, an HTTP
model) has its sentences passed through the safety gate (:func:`retrieval.rag.safety.gate`),
which takes out sides the query's evidence does not give, other patients' details and fragments.
When there is no evidence at all the draft says so (``status="nothing_to_draft"`` and a reason),
never an empty body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from retrieval.encoders.reading import FindingReader, FindingReading
from retrieval.entities import EntityExtractor, coarse_labels
from retrieval.index.base import IMAGE
from retrieval.rag.context import ContextBuilder
from retrieval.rag.findings import (
    AnalogCase,
    FindingsTable,
    Method,
    build_table,
    entity_sides,
    unsided_labels,
)
from retrieval.rag.safety import gate
from retrieval.rag.types import NOTHING_TO_DRAFT, Draft, DraftImages, Generator
from retrieval.records import PRESENT, Label, LabelKey, Status, collapse
from retrieval.search import CaseHit, Query, Searcher
from retrieval.taxonomy import Taxonomy, default_taxonomy


class DraftInputError(ValueError):
    """A draft request that cannot be honoured as given (a prior of another patient, a prior dated
    after the query): the message says which and what to do."""


def case_labels(hit: CaseHit, ex: EntityExtractor, tax: Taxonomy) -> dict[LabelKey, Status] | None:
    """What an analog case states, at the coarse anatomy level: its report's entities, or a
    labelled source's labels (every listed finding present, the rest absent by silence); None
    when the case states nothing (no report, no labels)."""
    if hit.report and hit.report.strip():
        return unsided_labels(coarse_labels(ex.extract(hit.report), tax), tax)
    if hit.labels is not None:
        return source_labels(hit.labels, tax)
    return None


def source_labels(names: Sequence[str], tax: Taxonomy) -> dict[LabelKey, Status]:
    """A labelled source's label names (NIH "Effusion") as present coarse keys; names outside the
    taxonomy (NIH "No Finding") state nothing."""
    found = []
    for name in names:
        try:
            f = tax.finding(name)
        except ValueError:
            continue
        found.append(Label(tax.coarse(f.anatomy), f.name, PRESENT))
    return collapse(found)


def read(searcher: Searcher, images: Sequence[np.ndarray]) -> FindingReading | None:
    enc = searcher.image_encoder
    if images and isinstance(enc, FindingReader):
        return enc.read_findings(list(images))
    return None


def findings_table(searcher: Searcher, images: Sequence[np.ndarray], hits: Sequence[CaseHit],
                   method: Method = "both", prior_images: Sequence[np.ndarray] = (),
                   prior_report: str | None = None, prior_study_id: str | None = None,
                   reading: FindingReading | None = None, prior_reading: FindingReading | None = None
                   ) -> FindingsTable:
    tax = default_taxonomy()
    ex = EntityExtractor(tax)
    reading = reading if reading is not None else read(searcher, images)
    cases = []
    for h in hits:
        labels = case_labels(h, ex, tax)
        if labels is not None:
            cases.append(AnalogCase(h.study_id, h.score, labels))
    if prior_reading is None and prior_images:
        prior_reading = read(searcher, prior_images)
    prior_labels, prior_sides = None, None
    if prior_report and prior_report.strip():
        ents = ex.extract(prior_report)
        prior_labels, prior_sides = unsided_labels(coarse_labels(ents, tax), tax), entity_sides(ents, tax)
    return build_table(reading, cases, method, prior_reading, prior_labels, prior_sides, prior_study_id)


def check_prior(query_patient: str | None, prior_patient: str | None, query_date: str | None,
                prior_date: str | None) -> None:
    """A prior must be the same patient's, and earlier: refuse anything else with a clear reason."""
    if query_patient and prior_patient and query_patient != prior_patient:
        raise DraftInputError("the prior study belongs to another patient: a comparison needs the same patient's "
                              "earlier study")
    if query_date and prior_date and prior_date > query_date:
        raise DraftInputError(f"the prior study is dated {prior_date}, after the current study ({query_date}): "
                              "give an earlier study as the prior")


def draft_report(searcher: Searcher, images: Sequence[np.ndarray], generator: Generator, q: Query,
                 prior_images: Sequence[np.ndarray] = (), prior_report: str | None = None,
                 prior_study_id: str = "prior", prior_date: str | None = None,
                 token_budget: int = 1500, reference_images: int = 3, query_date: str | None = None,
                 method: Method = "both") -> Draft:
    """Retrieve the top ``q.k`` analog cases for ``images`` and draft from them and the reading.

    The prior study (when it is in the index too) is excluded from the analog cases: it is the
    comparison, not evidence about how the current image reads.
    """
    check_prior(q.exclude_patient_id, None, query_date, prior_date)
    if prior_study_id != "prior" and not q.exclude_study_id:
        q = replace(q, exclude_study_id=prior_study_id)
    if IMAGE in searcher.index.meta.spaces or any(s.startswith(IMAGE + "@") for s in searcher.index.meta.spaces):
        res = searcher.by_image(list(images), q)
    else:
        res = searcher.reports_by_image(list(images), q)
    prior_id = prior_study_id if (prior_report or prior_images) else None
    table = findings_table(searcher, images, res.hits, method, prior_images, prior_report, prior_id)
    ctx = ContextBuilder(token_budget).build(
        [(h.study_id, h.score, h.report) for h in res.hits],
        prior=(prior_study_id, prior_report, prior_date) if prior_report else None,
        anatomy=q.anatomy, finding=q.finding)
    ctx = replace(ctx, table=table)
    if table.empty:
        d = Draft.for_context(ctx, getattr(generator, "name", "generator"))
        d.status, d.reason = "nothing_to_draft", NOTHING_TO_DRAFT
        return d
    refs = []
    if getattr(generator, "name", "") not in ("extractive", "structured") and reference_images:
        refs = _reference_images(searcher, res.hits, reference_images)
    draft = generator.generate(ctx, DraftImages(list(images), list(prior_images), refs))
    if getattr(generator, "name", "") != "structured":
        draft = gate(draft, table)
    draft.table = table
    return draft


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
