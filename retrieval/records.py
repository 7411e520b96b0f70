"""The typed values that cross layers: a study, a mined label, an index point's payload.

Why here, at the bottom: sources (indexer) write studies, builds write payloads, search and the
API read them, evaluation reads both. Each used to pass dicts and ``"anatomy|finding|status"``
strings that every reader split again; one definition here means a renamed field or a new status
fails type checks everywhere at once instead of silently matching nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

import msgspec

Status = Literal["present", "uncertain", "absent"]
PRESENT: Status = "present"
UNCERTAIN: Status = "uncertain"
ABSENT: Status = "absent"
STATUS_RANK: dict[str, int] = {ABSENT: 0, UNCERTAIN: 1, PRESENT: 2}
STATUS_VALUE: dict[str, float] = {PRESENT: 1.0, UNCERTAIN: 0.5, ABSENT: 0.0}


class Study(msgspec.Struct, frozen=True, omit_defaults=True):
    """One line of a manifest: the unit every source yields and every build indexes."""

    study_id: str
    images: list[str] = []  # paths, relative to the manifest's folder or absolute
    report: str | None = None
    patient_id: str | None = None
    study_date: str | None = None  # YYYY-MM-DD
    modality: str | None = None
    view: list[str] | None = None  # per image, when known (PA, AP, LATERAL, ...)
    # ground-truth labels from a labelled source (e.g. NIH finding labels); None: mine the report
    labels: list[str] | None = None
    # graded similarity inputs where a source has them (e.g. radiologists' severity scores)
    scores: dict[str, float] | None = None
    # per-image extra metadata (lung boxes, per-image notes), parallel to ``images``
    image_meta: list[dict[str, Any]] | None = None
    # True once :func:`indexer.deid.deidentify_study` ran (pseudonymised patient, shifted dates,
    # de-identified report): a later pass leaves the study as it is instead of hashing twice
    deidentified: bool = False


class LabelKey(NamedTuple):
    """What a label is about, without its status: the key of a collapsed label set."""

    anatomy: str
    finding: str


class Label(msgspec.Struct, frozen=True, order=True):
    """A finding stated about an anatomy with a status (JSON: {"anatomy", "finding", "status"})."""

    anatomy: str
    finding: str
    status: Status

    @property
    def key(self) -> LabelKey:
        return LabelKey(self.anatomy, self.finding)

    def __str__(self) -> str:  # for people (CLI, logs); code uses the fields
        return f"{self.anatomy}: {self.finding} ({self.status})"


def collapse(labels: Iterable[Label]) -> dict[LabelKey, Status]:
    """One status per (anatomy, finding): present beats uncertain beats absent.

    Reports often say "no effusion on the right" and "small left effusion" in one breath, and a
    normal statement ("lungs are clear") must not erase a specific positive one. This is the only
    place that rule lives (entities, similarity, drafting and evaluation all call it).
    """
    out: dict[LabelKey, Status] = {}
    for lab in labels:
        cur = out.get(lab.key)
        if cur is None or STATUS_RANK[lab.status] > STATUS_RANK[cur]:
            out[lab.key] = lab.status
    return out


def as_labels(collapsed: dict[LabelKey, Status]) -> list[Label]:
    return sorted(Label(k.anatomy, k.finding, s) for k, s in collapsed.items())


class Mention(msgspec.Struct, frozen=True):
    """Where a report states a label: character offsets into the payload's ``report`` (what the
    API highlights). Mined once, when the study is indexed, not on every answer."""

    start: int
    end: int
    anatomy: str
    finding: str
    status: Status


class Payload(msgspec.Struct, frozen=True, omit_defaults=True):
    """What an index point carries besides its vectors (one image, or a report-only study).

    Filter fields are flat lists of keywords because both backends index those natively:
    ``findings`` (stated present), ``findings_any`` (present or hedged), ``anatomy_findings``
    ``"<anatomy>:<finding>"`` listed for the anatomy *and its ancestors*, so a filter on
    ``lung:effusion`` matches a left lower lobe effusion.
    """

    study_id: str
    patient_id: str | None = None
    study_date: str | None = None
    study_day: int | None = None  # days since 1970-01-01, for range filters
    modality: str | None = None
    image: str | None = None  # opaque-to-readers image reference, relative to the index image root
    image_key: str | None = None  # content hash of the image: identifies the same pixels anywhere
    view: str | None = None
    report: str | None = None
    has_report: bool = False
    findings: list[str] = []
    findings_any: list[str] = []
    findings_absent: list[str] = []
    anatomy_findings: list[str] = []
    anatomy_findings_any: list[str] = []
    entities: list[Label] = []
    labels: list[str] | None = None  # a labelled source's own label names ([] = normal, e.g. "No Finding")
    # the report's mentions, mined at build time (None: an index built before they were stored)
    mentions: list[Mention] | None = None

    @classmethod
    def of(cls, raw: dict[str, Any] | Payload) -> Payload:
        """A payload as stored by a backend (JSON builtins) back into its type."""
        if isinstance(raw, Payload):
            return raw
        return msgspec.convert(raw, cls)

    def to_builtins(self) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out
