"""The typed findings table a draft is rendered from: per (coarse anatomy, finding), a status with
its evidence kept apart.

Two kinds of evidence, never mixed up:

* **the query image's own reading** (:class:`~retrieval.encoders.reading.FindingReading`): a
  calibrated probability per finding the checkpoint's probe reads, with thresholds chosen inside
  the training images; the only evidence for *where* (a side) besides the patient's own prior;
* **the analog cases' statements**: each retrieved case's status for the finding (its report's
  entities, or a labelled source's labels; silence counts as absent, as radiologists leave
  normal structures unmentioned), weighted by retrieval score into a vote in [0, 1] (present 1,
  hedged 0.5). A case says *whether*, never *where*: its side is not read.

The status of a row comes from the fused probability (the mean of the image's calibrated
probability and the vote; the 0.5/0.5 weight was fixed a priori, not tuned) against the
finding's calibrated thresholds. A finding the image does not read at all can only be *hedged*,
and only on a majority vote (``CASE_ONLY_AT``): another patient's positive finding is never
stated as this patient's on retrieval alone.

Sides: stated only when the image reading gives one, or when the patient's own prior states one
and the current reading does not contradict it (the finding is not read as absent now).

Interval change (with a prior): from the two studies' own readings (and the prior's report where
the prior was not read), hedged when the difference is within the reading's noise; analog cases
never decide it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from retrieval.encoders.reading import FindingProbability, FindingReading, Side
from retrieval.entities import Entity
from retrieval.records import ABSENT, PRESENT, STATUS_VALUE, UNCERTAIN, LabelKey, Status
from retrieval.taxonomy import Taxonomy

Method = Literal["both", "image", "retrieval"]
ChangeKind = Literal["new", "increased", "decreased", "resolved", "unchanged"]
IMAGE_WEIGHT = 0.5  # fused = w * image + (1 - w) * vote; fixed a priori (docs/drafting.md)
CASE_ONLY_AT = 0.5  # a finding the image cannot read is hedged only on this share of the vote
DEFAULT_UNCERTAIN_AT = 0.5  # retrieval alone, a finding without calibration: a majority vote


@dataclass(frozen=True)
class CaseStatement:
    """One analog case's status for a finding (``absent`` when the case is silent about it)."""

    study_id: str
    score: float
    status: Status


@dataclass(frozen=True)
class FindingRow:
    key: LabelKey
    status: Status
    probability: float  # what decided the status (fused, image or vote, by the table's method)
    image: FindingProbability | None  # the query's own reading; None: the image does not read it
    vote: float | None  # score-weighted share of the cases stating it (hedged counts half)
    cases: tuple[CaseStatement, ...] = ()
    side: Side | None = None
    side_source: Literal["image", "prior"] | None = None

    def agreeing(self) -> tuple[CaseStatement, ...]:
        """The cases whose statement agrees with the row's status (present and hedged agree with a
        positive row; absent with an absent one): the cases a sentence about it may cite."""
        positive = self.status != ABSENT
        return tuple(c for c in self.cases if (c.status != ABSENT) == positive)


@dataclass(frozen=True)
class ChangeRow:
    key: LabelKey
    change: ChangeKind
    hedged: bool  # the difference is within the reading's noise (or only a report was compared)
    current: float | None  # calibrated probability now
    prior: float | None  # calibrated probability on the prior image (None: not read)
    prior_status: Status | None  # what the prior's report states (None: no report or silent)
    side: Side | None = None


@dataclass
class FindingsTable:
    rows: list[FindingRow] = field(default_factory=list)
    changes: list[ChangeRow] = field(default_factory=list)
    method: Method = "both"
    read: bool = False  # the query image was read (a calibrated probe)
    cases: int = 0  # analog cases with statements
    prior_study: str | None = None

    def positive(self) -> list[FindingRow]:
        return [r for r in self.rows if r.status != ABSENT]

    def row(self, key: LabelKey) -> FindingRow | None:
        return next((r for r in self.rows if r.key == key), None)

    @property
    def empty(self) -> bool:
        """Nothing to say with evidence: no reading and no case statements."""
        return not self.read and self.cases == 0


@dataclass(frozen=True)
class AnalogCase:
    study_id: str
    score: float
    labels: dict[LabelKey, Status]  # coarse anatomy


def entity_sides(entities: Sequence[Entity], tax: Taxonomy) -> dict[LabelKey, Side]:
    """The sides a report states its positive findings on, per coarse key (both: bilateral)."""
    seen: dict[LabelKey, set[str]] = {}
    for e in entities:
        if e.status == ABSENT:
            continue
        side = anatomy_side(e.anatomy, tax)
        if side is not None:
            seen.setdefault(LabelKey(unsided(e.anatomy, tax), e.finding), set()).add(side)
    out: dict[LabelKey, Side] = {}
    for k, sides in seen.items():
        out[k] = "bilateral" if "bilateral" in sides or sides >= {"left", "right"} else ("left" if "left" in sides
                                                                                           else "right")
    return out


def unsided(anatomy: str, tax: Taxonomy) -> str:
    """The anatomy without its side ("left lung" -> "lung", "right pleura" -> "pleura"): the level
    the table keeps, since a side is evidence of its own (``FindingRow.side``)."""
    for a in (anatomy, *tax.ancestors(anatomy)):
        if anatomy_side(a, tax) is None and not a.startswith(("left ", "right ")):
            return tax.coarse(a) if anatomy_side(tax.coarse(a), tax) is None else a
    return anatomy


def unsided_labels(labels: dict[LabelKey, Status], tax: Taxonomy) -> dict[LabelKey, Status]:
    from retrieval.records import Label, collapse

    return collapse(Label(unsided(k.anatomy, tax), k.finding, st) for k, st in labels.items())


def anatomy_side(anatomy: str, tax: Taxonomy) -> Side | None:
    for a in (anatomy, *tax.ancestors(anatomy)):
        if a.startswith("left "):
            return "left"
        if a.startswith("right "):
            return "right"
        if a.startswith("bilateral"):
            return "bilateral"
    return None


def build_table(reading: FindingReading | None, cases: Sequence[AnalogCase], method: Method = "both",
                prior_reading: FindingReading | None = None, prior_labels: dict[LabelKey, Status] | None = None,
                prior_sides: dict[LabelKey, Side] | None = None, prior_study: str | None = None) -> FindingsTable:
    """The findings table of one query (see the module docstring for every rule)."""
    use_image = reading is not None and method in ("both", "image")
    use_cases = bool(cases) and method in ("both", "retrieval")
    total = sum(max(c.score, 0.0) for c in cases) or 1.0
    keys: list[LabelKey] = []
    if use_image and reading is not None:
        keys += list(reading.findings)
    if use_cases:
        for c in cases:
            keys += [k for k, st in c.labels.items() if st != ABSENT and k not in keys]
    seen: set[LabelKey] = set()
    rows: list[FindingRow] = []
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        img = reading.get(key) if (use_image and reading is not None) else None
        calib = reading.get(key) if reading is not None else None  # thresholds, even when not used
        statements = tuple(CaseStatement(c.study_id, c.score, c.labels.get(key, ABSENT)) for c in cases) \
            if use_cases else ()
        vote = (sum(max(s.score, 0.0) * STATUS_VALUE[s.status] for s in statements) / total
                if statements else None)
        status, prob = _decide(img, vote, calib)
        side: Side | None = None
        source: Literal["image", "prior"] | None = None
        if status != ABSENT:
            if reading is not None and key in reading.sides and use_image:
                side, source = reading.sides[key], "image"
            elif prior_sides and key in prior_sides:
                side, source = prior_sides[key], "prior"
        rows.append(FindingRow(key, status, prob, img, vote, statements, side, source))
    table = FindingsTable(rows, [], method, use_image, len(cases) if use_cases else 0, prior_study)
    if prior_reading is not None or prior_labels:
        table.changes = compare(table, reading if use_image else None, prior_reading, prior_labels or {},
                                prior_sides or {})
    return table


def _decide(img: FindingProbability | None, vote: float | None, calib: FindingProbability | None
            ) -> tuple[Status, float]:
    if img is not None:
        p = img.probability if vote is None else IMAGE_WEIGHT * img.probability + (1 - IMAGE_WEIGHT) * vote
        if img.present_at is not None and p >= img.present_at:
            return PRESENT, p
        return (UNCERTAIN if p >= img.uncertain_at else ABSENT), p
    if vote is None:
        return ABSENT, 0.0
    if calib is not None:  # retrieval alone on a finding the probe reads: its calibrated thresholds
        if calib.present_at is not None and vote >= calib.present_at:
            return PRESENT, vote
        return (UNCERTAIN if vote >= calib.uncertain_at else ABSENT), vote
    return (UNCERTAIN if vote >= max(CASE_ONLY_AT, DEFAULT_UNCERTAIN_AT) else ABSENT), vote


def compare(table: FindingsTable, reading: FindingReading | None, prior_reading: FindingReading | None,
            prior_labels: dict[LabelKey, Status], prior_sides: dict[LabelKey, Side]) -> list[ChangeRow]:
    """Interval change per finding from the two studies' own evidence (never the analog cases):
    without the current image's own reading no change is claimed at all."""
    out: list[ChangeRow] = []
    if reading is None:
        return out
    keys = [r.key for r in table.rows] + [k for k, st in prior_labels.items() if st != ABSENT]
    done: set[LabelKey] = set()
    for key in keys:
        if key in done:
            continue
        done.add(key)
        row = table.row(key)
        cur = reading.get(key)
        pri = prior_reading.get(key) if prior_reading is not None else None
        now_pos = cur is not None and cur.status != ABSENT
        p_status = prior_labels.get(key)
        if pri is not None:
            before_pos = pri.status != ABSENT or p_status in (PRESENT, UNCERTAIN)
        else:
            before_pos = p_status in (PRESENT, UNCERTAIN)
        if not now_pos and not before_pos:
            continue
        if cur is not None and pri is not None:
            delta = cur.probability - pri.probability
            within = abs(delta) <= max(cur.noise, pri.noise)
        else:
            delta, within = 0.0, True  # only a report to compare with: any change claimed is hedged
        side = row.side if row is not None and row.side else prior_sides.get(key) if now_pos else None
        if now_pos and before_pos:
            kind: ChangeKind = "unchanged" if within else ("increased" if delta > 0 else "decreased")
            out.append(ChangeRow(key, kind, cur is None or pri is None or (within and kind != "unchanged"),
                                 cur.probability if cur else None, pri.probability if pri else None, p_status, side))
        elif now_pos:
            out.append(ChangeRow(key, "new", within or delta <= 0, cur.probability if cur else None,
                                 pri.probability if pri else None, p_status, side))
        else:
            out.append(ChangeRow(key, "resolved", within or delta >= 0, cur.probability if cur else None,
                                 pri.probability if pri else None, p_status, prior_sides.get(key)))
    return out
