"""Similar-case search: image->image, text->image, image->report, text->report, conditioned.

Anatomy conditioning uses two mechanisms, and says which it used:

1. **Conditioned embedding** (the RadIR idea): when the index holds an ``image@<anatomy>`` space
   (built by an anatomy-aware encoder), the query is embedded for that anatomy and searched
   there, so "similar left lung" ranks by left-lung appearance. A part without its own space
   (``left lower lobe``) uses its nearest ancestor that has one (``left lung``).
2. **Entity filter**: ``finding`` restricts candidates to studies whose *report* states that
   finding (in ``anatomy`` or a part of it, when both are given). Reports are precise about what
   is present; embeddings are good at how it looks. The filter guarantees the named finding,
   the embedding orders the cases that have it.
3. **Finding asked of the image** (``finding_by="image"``): with an encoder that reads findings
   from pixels (medrag-native with a label probe), the query vector *states* the finding in its
   anatomy's space and no report filter applies, so studies without a report (a PACS archive)
   are found too: "looks like this one, and the image reads as showing cardiomegaly". Weaker
   than a report's word, stronger than the query image's own reading of it (README, "Real chest
   X-rays").

Results are studies, not images: a study's score is its best image's score, the query's own
study is always excluded, and the query patient's other studies optionally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec
import numpy as np

from retrieval.batching import Batching
from retrieval.encoders import EncoderError, encoder_from_description, is_joint
from retrieval.encoders.base import FindingQueries, ImageEncoder, TextEncoder, l2_normalise
from retrieval.imaging.images import pixel_key
from retrieval.index import (
    IMAGE,
    REPORT,
    REPORT_JOINT,
    Hit,
    SearchFilter,
    VectorIndex,
    anatomy_space,
)
from retrieval.records import ABSENT, Label, Mention, Payload
from retrieval.taxonomy import Taxonomy, default_taxonomy

FindingBy = Literal["report", "image"]  # who states a query's finding: the reports, or the image itself


class SearchError(ValueError):
    """A query that cannot be answered as asked (clear, user-facing)."""


@dataclass(frozen=True)
class Query:
    k: int = 10
    anatomy: str | None = None
    finding: str | None = None
    modality: tuple[str, ...] | None = None
    include_uncertain: bool = False  # hedged findings ("possible effusion") pass the filter
    finding_by: FindingBy = "report"  # "report": filter by what reports state; "image": ask it of the pixels
    exclude_study_id: str | None = None
    exclude_patient_id: str | None = None
    date_from: str | None = None
    date_to: str | None = None
    exclude_image_keys: tuple[str, ...] = ()  # content keys of the query's own images


@dataclass(frozen=True)
class CaseHit:
    study_id: str
    score: float
    point_id: int
    image: str | None
    modality: str | None
    study_date: str | None
    report: str | None
    matched_entities: list[Label]
    images_matched: int = 1
    stated: list[Label] = field(default_factory=list)  # every present/hedged label of the case
    labels: list[str] | None = None  # a labelled source's label names ([]: normal)
    mentions: list[Mention] | None = None  # where the report states its labels (None: not stored)


@dataclass(frozen=True)
class SearchResult:
    mode: str  # e.g. "image->image"
    space: str  # the vector space searched
    conditioning: str  # "embedding:<anatomy>", "filter", "embedding+filter" or "none"
    filter: dict[str, Any]
    hits: list[CaseHit] = field(default_factory=list)


class Searcher:
    """Answers queries against one index with the encoders it was built with.

    ``batching`` (a server's concurrent callers): the index and encoders are wrapped here, once, in
    :mod:`retrieval.batching` wrappers that satisfy the same protocols; nothing swaps them later.
    """

    def __init__(self, index: VectorIndex, image_encoder: ImageEncoder | None = None,
                 text_encoder: TextEncoder | None = None, taxonomy: Taxonomy | None = None,
                 batching: Batching | None = None) -> None:
        if batching is not None:
            index = batching.index(index)
            image_encoder = batching.image_encoder(image_encoder)
            text_encoder = batching.text_encoder(text_encoder)
        self.index = index
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.tax = taxonomy or default_taxonomy()

    @classmethod
    def for_index(cls, index: VectorIndex, device: str = "cpu", load_text: bool = True,
                  batching: Batching | None = None) -> Searcher:
        """Recreate the encoders the index was built with (from its metadata)."""
        meta = index.meta
        image = encoder_from_description(meta.image_encoder, device) if meta.image_encoder else None
        text = encoder_from_description(meta.text_encoder, device) if (meta.text_encoder and load_text) else None
        return cls(index, image, text, batching=batching)

    # ---- query kinds -----------------------------------------------------------------------
    def by_image(self, images: Sequence[np.ndarray], q: Query) -> SearchResult:
        if self.image_encoder is None:
            raise SearchError("this searcher has no image encoder")
        space, anatomy = self._space(self._anatomy(q))
        vec = self._ask(self._mean(self.image_encoder.encode_images(list(images), anatomy=anatomy)), anatomy, q)
        # the query's own pixels never count as a result, whatever study id they are stored under
        q = _replace(q, exclude_image_keys=(*q.exclude_image_keys, *(pixel_key(i) for i in images)))
        return self._run("image->image", space, vec, q, conditioned=anatomy is not None)

    def by_study(self, study_id: str, q: Query, same_patient: bool = True) -> SearchResult:
        """Cases similar to a study already in the index (its stored vectors are the query)."""
        points = [p for p in self.index.find(SearchFilter(study_ids=[study_id]), limit=256) if p.payload.image]
        if not points:
            raise SearchError(f"study {study_id!r} is not in the index (or has no image)")
        space, anatomy = self._space(self._anatomy(q))
        vec = self._ask(self._mean(self.index.vectors(space, [p.id for p in points])), anatomy, q)
        patient = points[0].payload.patient_id
        q2 = _replace(q, exclude_study_id=study_id,
                      exclude_patient_id=q.exclude_patient_id or (None if same_patient else patient))
        return self._run("study->image", space, vec, q2, conditioned=anatomy is not None)

    def by_text(self, text: str, q: Query) -> SearchResult:
        """Text -> image; needs a joint (CLIP-style) image encoder."""
        self._image_query_only(q)
        enc = self.image_encoder
        if not is_joint(enc):
            raise SearchError("text->image search needs a joint image-text encoder (open_clip, hf CLIP); "
                              f"this index was built with {self.index.meta.image_encoder}")
        if q.anatomy:
            raise SearchError("anatomy conditioning applies to image queries; use finding= to filter text queries")
        vec = self._mean(enc.encode_texts([text]))
        return self._run("text->image", IMAGE, vec, q, conditioned=False)

    def reports_by_text(self, text: str, q: Query) -> SearchResult:
        """Text -> report (report embedding space)."""
        self._image_query_only(q)
        if self.text_encoder is None or REPORT not in self.index.meta.spaces:
            raise SearchError("this index has no report space (built without a text encoder)")
        vec = self._mean(self.text_encoder.encode_texts([text]))
        return self._run("text->report", REPORT, vec, q, conditioned=False)

    def reports_by_image(self, images: Sequence[np.ndarray], q: Query) -> SearchResult:
        """Image -> report: cross-modal when the encoder is joint, else via similar images."""
        enc = self.image_encoder
        if REPORT_JOINT in self.index.meta.spaces and is_joint(enc):
            self._image_query_only(q)  # the report space carries no image reading of findings
            vec = self._mean(enc.encode_images(list(images)))
            return self._run("image->report", REPORT_JOINT, vec, _replace(q, anatomy=None), conditioned=False)
        res = self.by_image(images, q)
        return SearchResult("image->report(via similar images)", res.space, res.conditioning, res.filter,
                            [h for h in res.hits if h.report])

    def by_vector(self, vector: Sequence[float] | np.ndarray, space: str, q: Query) -> SearchResult:
        """A caller-embedded query vector against one stored space (clients that embed themselves)."""
        self._image_query_only(q)
        if space not in self.index.meta.spaces:
            raise SearchError(f"unknown space {space!r}; this index has: {', '.join(self.index.meta.spaces)}")
        vec = np.asarray(vector, dtype=np.float32).reshape(1, -1)
        dim = self.index.meta.spaces[space]
        if vec.shape[1] != dim or not np.isfinite(vec).all():
            raise SearchError(f"space {space!r} takes {dim} finite numbers, got {vec.shape[1]}")
        return self._run("vector", space, self._mean(vec), q, conditioned="@" in space)

    # ---- internals -------------------------------------------------------------------------
    def _finding_by_image(self, q: Query) -> bool:
        if q.finding_by not in ("report", "image"):
            raise SearchError(f"finding_by must be 'report' or 'image', got {q.finding_by!r}")
        if q.finding_by == "image" and not q.finding:
            raise SearchError("finding_by='image' needs a finding to ask for")
        return q.finding_by == "image"

    def _image_query_only(self, q: Query) -> None:
        if self._finding_by_image(q):
            raise SearchError("finding_by='image' applies to image and study queries (the query image states "
                              "the finding); use finding_by='report' to filter this one")

    def _finding_encoder(self) -> FindingQueries:
        enc = self.image_encoder
        if not isinstance(enc, FindingQueries):
            raise SearchError("finding_by='image' needs an encoder that reads findings from the image "
                              "(medrag-native with a label probe); this index was built with "
                              f"{self.index.meta.image_encoder}")
        return enc

    def _anatomy(self, q: Query) -> str | None:
        """The anatomy to search in: the query's, or, when a finding is asked of the image, the
        anatomy whose space reads it."""
        if not self._finding_by_image(q) or q.anatomy:
            return q.anatomy
        try:
            return self._finding_encoder().finding_space(q.finding or "")
        except EncoderError as exc:
            raise SearchError(str(exc)) from exc

    def _ask(self, vec: np.ndarray, anatomy: str | None, q: Query) -> np.ndarray:
        if not self._finding_by_image(q):
            return vec
        try:
            return self._finding_encoder().assert_finding(vec, anatomy, q.finding or "")
        except EncoderError as exc:
            raise SearchError(str(exc)) from exc

    def _space(self, anatomy: str | None) -> tuple[str, str | None]:
        if not anatomy:
            return IMAGE, None
        name = self.tax.anatomy(anatomy).name  # raises UnknownTermError with suggestions
        for a in self.tax.ancestors(name):
            if a in self.index.meta.conditioning:
                return anatomy_space(a), a
        return IMAGE, None

    @staticmethod
    def _mean(rows: np.ndarray) -> np.ndarray:
        if len(rows) == 0:
            raise SearchError("no query vector (empty query)")
        return l2_normalise(np.asarray(rows, dtype=np.float32).mean(0, keepdims=True))

    def _filter(self, q: Query) -> SearchFilter:
        findings = anatomy_findings = None
        if q.finding and not self._finding_by_image(q):
            f = self.tax.finding(q.finding).name
            if q.anatomy:
                anatomy_findings = [f"{self.tax.anatomy(q.anatomy).name}:{f}"]
            else:
                findings = [f]
        return SearchFilter(
            modality=list(q.modality) if q.modality else None, findings=findings,
            anatomy_findings=anatomy_findings, include_uncertain=q.include_uncertain,
            exclude_patient_id=q.exclude_patient_id,
            exclude_study_ids=[q.exclude_study_id] if q.exclude_study_id else None,
            date_from=q.date_from, date_to=q.date_to)

    def _run(self, mode: str, space: str, vec: np.ndarray, q: Query, conditioned: bool) -> SearchResult:
        if q.k <= 0:
            raise SearchError("k must be positive")
        flt = self._filter(q)
        fetch = q.k * 3 + 8
        while True:
            found = self.index.search(space, vec, fetch, flt)[0]
            points = [p for p in found if p.payload.image_key not in q.exclude_image_keys] \
                if q.exclude_image_keys else found
            hits = _by_study(points, q.k)
            if len(hits) >= q.k or len(found) < fetch or fetch >= 64 * q.k:
                break
            fetch *= 4
        kind = ("embedding:" + space.split("@", 1)[1]) if conditioned else ""
        asked = "image-finding:" + self.tax.finding(q.finding or "").name if self._finding_by_image(q) else ""
        kind = "+".join(x for x in (kind, asked or ("filter" if q.finding else "")) if x) or "none"
        return SearchResult(mode, space, kind, _builtins(flt),
                            [self._case(h, n, q) for h, n in hits])

    def _case(self, hit: Hit, n_images: int, q: Query) -> CaseHit:
        p = hit.payload
        return CaseHit(study_id=p.study_id, score=round(hit.score, 6), point_id=hit.id,
                       image=p.image, modality=p.modality, study_date=p.study_date,
                       report=p.report, matched_entities=self._matched(p, q), images_matched=n_images,
                       stated=[e for e in p.entities if e.status != ABSENT], labels=p.labels,
                       mentions=p.mentions)

    def _matched(self, payload: Payload, q: Query) -> list[Label]:
        ents = [e for e in payload.entities if e.status != ABSENT]
        if q.anatomy:
            scope = set(self.tax.descendants(self.tax.anatomy(q.anatomy).name))
            ents = [e for e in ents if e.anatomy in scope]
        if q.finding:
            f = self.tax.finding(q.finding).name
            ents = [e for e in ents if e.finding == f]
        return ents


def _by_study(points: list[Hit], k: int) -> list[tuple[Hit, int]]:
    best: dict[str, tuple[Hit, int]] = {}
    for h in points:
        sid = h.payload.study_id
        if sid in best:
            best[sid] = (best[sid][0], best[sid][1] + 1)
        else:
            best[sid] = (h, 1)
    return sorted(best.values(), key=lambda x: -x[0].score)[:k]


def _replace(q: Query, **kw: Any) -> Query:
    return replace(q, **kw)


def _builtins(flt: SearchFilter) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(flt)
    return out


__all__ = ["CaseHit", "EncoderError", "FindingBy", "Query", "SearchError", "SearchResult", "Searcher"]
