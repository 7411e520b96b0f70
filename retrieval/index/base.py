"""The ``VectorIndex`` protocol and the types every backend shares.

A point is one image (or, for a study with no image, its report). Each point carries vectors in
named *spaces* ("image", "image@left lung", "report", ...) and a payload: study id, patient,
modality, date, the report and its mined entities. Backends answer the same ``search`` with the
same filter semantics; ``tests/test_index_congruence.py`` holds them to it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import msgspec
import numpy as np

from retrieval.records import Payload

IMAGE = "image"
REPORT = "report"
REPORT_JOINT = "report_joint"


def anatomy_space(anatomy: str) -> str:
    """Name of the space holding embeddings conditioned on ``anatomy``."""
    return f"image@{anatomy}"


class IndexError_(RuntimeError):
    """An index that cannot be opened, written or queried (clear, user-facing)."""


class IndexMeta(msgspec.Struct, frozen=True):
    backend: str
    spaces: dict[str, int]  # space name -> dimension
    count: int
    image_encoder: dict[str, Any] | None = None
    text_encoder: dict[str, Any] | None = None
    conditioning: list[str] = []  # anatomies with an "image@<anatomy>" space
    index_kind: str = "flat"
    image_root: str | None = None  # folder the payloads' relative image paths resolve against
    version: str = ""
    created: str = ""


class SearchFilter(msgspec.Struct, frozen=True, omit_defaults=True):
    """Payload conditions; every field that is set must hold (AND).

    ``findings``: each must be stated present (or, with ``include_uncertain``, hedged) in the
    report; ``anatomy_findings``: "<anatomy>:<finding>" pairs, matched at the anatomy or any part
    below it (the payload lists ancestors).
    """

    modality: list[str] | None = None
    findings: list[str] | None = None
    anatomy_findings: list[str] | None = None
    include_uncertain: bool = False
    patient_id: str | None = None
    study_ids: list[str] | None = None
    exclude_patient_id: str | None = None
    exclude_study_ids: list[str] | None = None
    date_from: str | None = None  # YYYY-MM-DD inclusive
    date_to: str | None = None
    has_report: bool | None = None

    def matches(self, p: Payload) -> bool:
        """Reference semantics (FAISS evaluates it; Qdrant translates it)."""
        if self.modality and p.modality not in self.modality:
            return False
        found = p.findings_any if self.include_uncertain else p.findings
        if self.findings and not set(self.findings) <= set(found):
            return False
        pairs = p.anatomy_findings_any if self.include_uncertain else p.anatomy_findings
        if self.anatomy_findings and not set(self.anatomy_findings) <= set(pairs):
            return False
        if self.patient_id is not None and p.patient_id != self.patient_id:
            return False
        if self.study_ids is not None and p.study_id not in self.study_ids:
            return False
        if self.exclude_patient_id is not None and p.patient_id == self.exclude_patient_id:
            return False
        if self.exclude_study_ids and p.study_id in self.exclude_study_ids:
            return False
        day = p.study_day
        if self.date_from is not None and (day is None or day < date_to_day(self.date_from)):
            return False
        if self.date_to is not None and (day is None or day > date_to_day(self.date_to)):
            return False
        if self.has_report is not None and bool(p.report) != self.has_report:
            return False
        return True

    def is_empty(self) -> bool:
        return self == SearchFilter()


def date_to_day(value: str) -> int:
    """Days since 1970-01-01, the integer the payload stores for range filters."""
    try:
        return (dt.date.fromisoformat(value) - dt.date(1970, 1, 1)).days
    except ValueError as exc:
        raise ValueError(f"invalid date {value!r}; expected YYYY-MM-DD") from exc


@dataclass(frozen=True)
class Hit:
    """One point found: its id, its score (0 for :meth:`VectorIndex.find`) and its payload, typed
    by the backend that read it (the one place stored JSON becomes a :class:`Payload`)."""

    id: int
    score: float
    payload: Payload


@dataclass(frozen=True, eq=False)  # eq=False: an array field has no truth-valued ==
class SearchRequest:
    """One query of a :meth:`VectorIndex.search_batch`: its own space, ``k`` and filter.

    A batch may mix spaces, ``k`` and filters (e.g. each query excluding its own study), which
    ``search`` (one space, one ``k``, one filter for all rows) cannot express.
    """

    space: str
    vector: np.ndarray  # (dim,) or (1, dim)
    k: int
    flt: SearchFilter | None = None

    def row(self) -> np.ndarray:
        """The vector as one float32 row, shape (1, dim)."""
        v = np.asarray(self.vector, dtype=np.float32)
        if v.ndim > 2 or (v.ndim == 2 and v.shape[0] != 1) or v.ndim == 0:
            raise IndexError_(f"a search request holds one vector, got shape {v.shape}")
        return v.reshape(1, -1)


@runtime_checkable
class VectorIndex(Protocol):
    uri: str
    meta: IndexMeta
    concurrent_reads: bool  # search/find/vectors may be called from several threads at once

    def __len__(self) -> int: ...

    def search(self, space: str, queries: np.ndarray, k: int,
               flt: SearchFilter | None = None) -> list[list[Hit]]:
        """Top-``k`` points per query row by inner product in ``space``, filtered."""
        ...

    def search_batch(self, requests: Sequence[SearchRequest]) -> list[list[Hit]]:
        """Answer several requests at once, in order: the same hits as one ``search`` call each
        (ties aside), in as few engine calls as the backend allows (one for Qdrant)."""
        ...

    def payloads(self, ids: Sequence[int]) -> list[Payload]: ...

    def find(self, flt: SearchFilter, limit: int = 100) -> list[Hit]:
        """Points matching ``flt`` (no vector), e.g. all images of one study."""
        ...

    def vectors(self, space: str, ids: Sequence[int]) -> np.ndarray: ...

    def close(self) -> None: ...


@runtime_checkable
class IndexWriter(Protocol):
    def add(self, ids: np.ndarray, vectors: dict[str, np.ndarray], payloads: list[dict[str, Any]],
            present: dict[str, np.ndarray] | None = None) -> None:
        """Add points; ``present[space]`` masks rows that have no vector in that space."""
        ...

    def commit(self) -> str:
        """Publish atomically; returns the version name. Readers switch only after this."""
        ...

    def abort(self) -> None: ...
