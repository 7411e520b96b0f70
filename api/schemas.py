"""Request and response bodies (msgspec structs: validated on the way in, fast on the way out)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from litestar.datastructures import UploadFile
from msgspec import Meta

from retrieval.records import Label

# The constraints the server enforces, stated in the OpenAPI schema (a request the schema allows
# must not be turned away). ``max_k`` of the settings may lower K_MAX, never raise it.
K_MAX = 100
TEXT_MAX = 20_000  # characters of a free-text query (the encoder reads far fewer)
VECTOR_MAX = 4096  # numbers in a client-embedded query vector; the served space fixes the exact count
K = Annotated[int, Meta(ge=1, le=K_MAX, description="number of studies to return")]
QueryText = Annotated[str, Meta(min_length=1, max_length=TEXT_MAX, pattern=r"\S",
                                description="free text; not empty or only whitespace")]
Vector = Annotated[list[float], Meta(min_length=1, max_length=VECTOR_MAX,
                                     description="the query embedding (any scale: it is L2-normalised)")]


class Highlight(msgspec.Struct, frozen=True):
    start: int  # character offsets into the report
    end: int
    anatomy: str
    finding: str
    status: str  # present | uncertain | absent
    matched: bool  # one of the entities the query asked for


class CaseOut(msgspec.Struct, frozen=True):
    study_id: str
    score: float
    modality: str | None
    study_date: str | None
    report: str | None
    matched_entities: list[Label]
    highlights: list[Highlight]
    thumbnail: str | None  # URL of the server-rendered thumbnail (needs the API key)
    images_matched: int


class SearchOut(msgspec.Struct, frozen=True):
    mode: str
    space: str
    conditioning: str
    filter: dict[str, Any]
    took_ms: float
    hits: list[CaseOut]


class TextSearchIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: QueryText
    target: Literal["auto", "images", "reports"] = "auto"
    finding: str | None = None
    anatomy: str | None = None  # with finding: where it must be stated
    modality: list[str] | None = None
    exclude_patient: str | None = None
    include_uncertain: bool = False
    k: K = 10


class VectorSearchIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    vector: Vector
    space: str = "image"
    finding: str | None = None
    modality: list[str] | None = None
    exclude_patient: str | None = None
    k: K = 10


class EntityOut(msgspec.Struct, frozen=True):
    anatomy: str
    finding: str
    status: str
    text: str


class CaseDetail(msgspec.Struct, frozen=True):
    study_id: str
    modality: str | None
    study_date: str | None
    report: str | None
    entities: list[EntityOut]
    highlights: list[Highlight]
    images: list[str]  # thumbnail URLs, one per stored image


class DraftSentenceOut(msgspec.Struct, frozen=True):
    text: str
    citations: list[str]


class DraftOut(msgspec.Struct, frozen=True):
    generator: str
    disclaimer: str
    findings: list[DraftSentenceOut]
    comparison: list[DraftSentenceOut]
    impression: list[DraftSentenceOut]
    cases_used: list[dict[str, Any]]
    text: str  # the rendered draft, citations inline
    status: str = "drafted"  # drafted | nothing_to_draft
    reason: str | None = None  # why there is nothing to draft (status nothing_to_draft)


class Health(msgspec.Struct, frozen=True):
    status: str  # ok | starting | error
    ready: bool
    index: dict[str, Any] | None = None  # the version being served ("version") and its size
    detail: str | None = None  # why not ready; or, when ready, why a newer version is not served
    reload_error: str | None = None  # a published version that failed to open (the served one keeps serving)


class Taxonomy(msgspec.Struct, frozen=True):
    anatomies: list[str]
    conditioned: list[str]  # anatomies with their own embedding space in this index
    findings: list[str]


class ErrorOut(msgspec.Struct, frozen=True):
    """Every error body: ``status_code`` always equals the HTTP status of the response."""

    status_code: int
    detail: str
    extra: dict[str, Any] | list[Any] | None = None


@dataclass
class ImageSearchForm:
    """Multipart: the image file plus the query's options as form fields."""

    image: UploadFile
    anatomy: str | None = None
    finding: str | None = None
    finding_by: Literal["report", "image"] = "report"  # report: filter by reports; image: ask the pixels
    modality: str | None = None  # comma-separated
    exclude_patient: str | None = None
    include_uncertain: bool = False
    reports: bool = False  # image -> report instead of image -> image
    k: K = 10


@dataclass
class DraftForm:
    image: UploadFile
    prior_image: UploadFile | None = None
    prior_report: str | None = None
    prior_study_id: str | None = None
    prior_date: str | None = None
    anatomy: str | None = None
    finding: str | None = None
    exclude_patient: str | None = None
    k: K = 5
