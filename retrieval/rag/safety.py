"""The safety checker: what must never reach a radiologist in a draft, counted and gated.

Four kinds of issue, each a defect on its own (one wrong-side draft ends trust in the product):

* **side**: a sentence names a side for a finding that the query's own evidence does not give
  (``unsupported``: no side reading and no prior stating it) or contradicts (``conflict``: the
  reading, or the reference report when one exists, puts it on the other side);
* **patient**: content specific to a patient: numbers (with or without units), ages, sex words,
  dates, history / symptom / lab / treatment vocabulary, names and titles, institutions,
  publication references ("Figs."), CT-only descriptions. In a draft for *another* patient any of
  these came from an analog case's report;
* **contradiction**: the consistency checker's findings (:mod:`retrieval.rag.consistency`);
* **fragment**: a sentence with no finding and no verb, unbalanced brackets, or fewer than two
  words ("(Figs.", "g/l).").

:func:`gate` applies the same rules to any generator's draft (copy baselines, the edit drafters,
a VLM's or an HTTP model's parsed text): a side the evidence does not support is taken out of
the sentence when that leaves a sentence, and sentences with patient-specific content or that are
fragments are removed; every removal is recorded in ``Draft.removed``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Literal

from retrieval.encoders.reading import Side
from retrieval.entities import EntityExtractor
from retrieval.rag.consistency import ConsistencyChecker
from retrieval.rag.findings import FindingsTable, anatomy_side, entity_sides
from retrieval.rag.types import Draft, DraftSentence
from retrieval.records import ABSENT, LabelKey

IssueKind = Literal["side_unsupported", "side_conflict", "side_vs_reference", "patient", "contradiction", "fragment"]
KINDS: tuple[IssueKind, ...] = ("side_unsupported", "side_conflict", "side_vs_reference", "patient",
                                "contradiction", "fragment")

_PATIENT = [
    ("number", re.compile(r"\d")),
    ("age", re.compile(r"\b(year|yr)s?[- ]old\b|\baged?\s+\w+|\b(elderly|infant|child|adolescent|teen)\b", re.I)),
    ("sex", re.compile(r"\b(male|female|man|woman|men|women|boy|girl|gentleman|lady|he|she|his|her|him|hers)\b",
                       re.I)),
    ("date", re.compile(r"\b(jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*\.?\s+\d|\b(today|yesterday|"
                        r"tomorrow|day\s+\d|on\s+day|days?\s+(later|after|before|ago)|weeks?\s+(later|after|ago))\b",
                        re.I)),
    ("history", re.compile(
        r"\b(history|histories|hx|presented|presenting|presentation|admitted|admission|icu|intensive care|intubat\w*|"
        r"extubat\w*|ventilat\w*|fever\w*|febrile|cough\w*|dyspn\w*|symptom\w*|complain\w*|treated|treatment|therapy|"
        r"antibiotic\w*|steroid\w*|chemotherap\w*|transplant\w*|surgery|surgical|operation|smok\w*|laboratory|lab|"
        r"labs|crp|c-reactive|leukocyt\w*|lymphocyt\w*|lymphopeni\w*|wbc|white blood|d-dimer|saturation|spo2|oxygen|"
        r"pcr|rt-pcr|swab|positive for|tested|diagnos\w*|discharg\w*|hospital\w*|clinic|patient\w*|covid\w*|sars\w*|"
        r"coronavirus|influenza|pneumocystis|biopsy|travel\w*|contact|died|death|deceased|recovered|improvement of "
        r"symptoms|may explain|consistent with (the )?(history|clinical)|cop\b|boop|hiv|aids|immunocompromis\w*|"
        r"pregnan\w*|allerg\w*|medication|dose|mg)\b", re.I)),
    ("name", re.compile(r"\b(dr|mr|mrs|ms|prof)\.?\s+[A-Z]|\[name\]|\b(university|institute|medical center|"
                        r"general hospital|infirmary)\b", re.I)),
    ("publication", re.compile(r"\b(figs?|figure|table|panel|arrow\w*|arrowhead\w*)\b\.?", re.I)),
    ("ct", re.compile(r"\b(ct|hrct|cta|computed tomography|tomograph\w*|axial|coronal|sagittal|slice\w*|"
                      r"crazy[- ]paving|reversed halo|halo sign|tree[- ]in[- ]bud|hounsfield|hu)\b", re.I)),
]
_VERB = re.compile(r"\b(is|are|was|were|be|been|has|have|had|seen|noted|shown|demonstrated|identified|present|"
                   r"appears?|remains?|persists?|unchanged|resolved|increased|decreased|new|possible|clear|normal|"
                   r"enlarged|stable|no)\b", re.I)
_WORD = re.compile(r"[A-Za-z]{2,}")
_SIDE_WORD = re.compile(r"\b(left|right|bilateral|bilaterally|both)\b(\s*-?\s*sided)?\s*", re.I)


@dataclass(frozen=True)
class SafetyIssue:
    kind: IssueKind
    sentence: str
    detail: str


@dataclass
class SafetyReport:
    issues: list[SafetyIssue] = field(default_factory=list)

    def counts(self) -> Counter[str]:
        return Counter(i.kind for i in self.issues)


def patient_specific(text: str) -> list[str]:
    """Which patient-specific categories ``text`` contains (empty: none)."""
    return [name for name, rx in _PATIENT if rx.search(text)]


def fragment(text: str, ex: EntityExtractor) -> str | None:
    """Why ``text`` is a fragment, or None."""
    if text.count("(") != text.count(")") or text.count("[") != text.count("]"):
        return "unbalanced brackets"
    if len(_WORD.findall(text)) < 2:
        return "fewer than two words"
    if not ex.extract(text) and not _VERB.search(text):
        return "no finding and no verb"
    return None


class SafetyChecker:
    def __init__(self) -> None:
        self.ex = EntityExtractor()
        self.tax = self.ex.tax
        self.consistency = ConsistencyChecker(self.tax)

    def sentence_sides(self, text: str) -> dict[LabelKey, Side]:
        return entity_sides(self.ex.extract(text), self.tax)

    def check(self, draft: Draft, table: FindingsTable | None, reference: str | None = None) -> SafetyReport:
        """Every issue in ``draft``; ``table`` gives the query's side evidence (None: none at all)."""
        rep = SafetyReport()
        if draft.status == "nothing_to_draft":
            return rep
        allowed = _allowed_sides(table)
        image_sides = {r.key: r.side for r in (table.rows if table else []) if r.side and r.side_source == "image"}
        ref_sides = entity_sides(self.ex.extract(reference), self.tax) if reference else {}
        for s in draft.sentences():
            for key, side in self.sentence_sides(s.text).items():
                if key in image_sides and image_sides[key] != side:
                    rep.issues.append(SafetyIssue("side_conflict", s.text, f"{key.finding}: {side} vs read "
                                                                             f"{image_sides[key]}"))
                elif allowed.get(key) != side:
                    rep.issues.append(SafetyIssue("side_unsupported", s.text, f"{key.finding}: {side}"))
                if key in ref_sides and ref_sides[key] != side and "bilateral" not in (side, ref_sides[key]):
                    rep.issues.append(SafetyIssue("side_vs_reference", s.text,
                                                  f"{key.finding}: {side} vs reference {ref_sides[key]}"))
            for cat in patient_specific(s.text):
                rep.issues.append(SafetyIssue("patient", s.text, cat))
            why = fragment(s.text, self.ex)
            if why:
                rep.issues.append(SafetyIssue("fragment", s.text, why))
        for c in self.consistency.check(draft):
            rep.issues.append(SafetyIssue("contradiction", str(c), c.rule))
        return rep


def _allowed_sides(table: FindingsTable | None) -> dict[LabelKey, Side]:
    return {r.key: r.side for r in (table.rows if table else []) if r.side and r.status != ABSENT} | \
        {c.key: c.side for c in (table.changes if table else []) if c.side}


def strip_sides(text: str) -> str:
    """The sentence without side words ("Moderate right pleural effusion" -> "Moderate pleural
    effusion"; "in the left lung" -> "in the lung")."""
    out = _SIDE_WORD.sub("", text)
    out = re.sub(r"\s{2,}", " ", out).strip()
    out = re.sub(r"\b(on|at) the\s*([.,;])", r"\2", out)
    return out[:1].upper() + out[1:] if out else out


def gate(draft: Draft, table: FindingsTable | None, checker: SafetyChecker | None = None) -> Draft:
    """``draft`` with the safety rules applied (see the module docstring); removals recorded."""
    if draft.status == "nothing_to_draft":
        return draft
    checker = checker or SafetyChecker()
    allowed = _allowed_sides(table)

    def keep(s: DraftSentence) -> DraftSentence | None:
        text = s.text
        sides = checker.sentence_sides(text)
        if any(allowed.get(k) != side for k, side in sides.items()):
            stripped = strip_sides(text)
            draft.removed.append(f"side taken out (no side evidence from the query): {text!r}")
            text = stripped
            if any(anatomy_side(e.anatomy, checker.tax) for e in checker.ex.extract(text)):
                draft.removed.append(f"removed (a side remains): {s.text!r}")
                return None
        cats = patient_specific(text)
        if cats:
            draft.removed.append(f"removed ({', '.join(cats)} from another case): {s.text!r}")
            return None
        why = fragment(text, checker.ex)
        if why:
            draft.removed.append(f"removed (fragment: {why}): {s.text!r}")
            return None
        return s if text == s.text else replace(s, text=text)

    for section in (draft.findings, draft.interval_changes, draft.impression):
        kept = [k for k in (keep(s) for s in section) if k is not None]
        section[:] = kept
    # what the removals left unsupported (an impression item whose finding sentence went, a
    # comparison line against the findings) goes too: the consistency checker names it
    for c in checker.consistency.check(draft):
        for section in (draft.interval_changes, draft.impression):
            gone = [s for s in section if s.text == c.first]
            if gone:
                draft.removed.append(f"removed ({c.rule}): {c.first!r}")
                section[:] = [s for s in section if s.text != c.first]
    if not draft.sentences():
        draft.status = "nothing_to_draft"
        draft.reason = ("Every sentence the drafter proposed carried another patient's details or an unsupported "
                        "side and was removed: nothing to draft.")
    return draft
