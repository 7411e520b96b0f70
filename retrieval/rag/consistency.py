"""Automatic consistency checks for a drafted report: what a radiologist would never sign.

Four rules, each over the entities our extractor reads from the draft's own sentences (not the
labels a generator claims, so a model's text is checked the same way as the extractive drafter's):

* ``normal-vs-finding``: a normal statement about an anatomy ("The lungs are clear.") beside a
  present or hedged finding in that anatomy or one of its parts ("Possible nodule (right lung).").
  A normal statement hedged by "otherwise"/"except" is exempt: it already allows for the finding.
* ``present-vs-absent``: the same finding stated absent for an anatomy and present or hedged for
  it or a part of it, in different sentences ("No pleural effusion." / "Small left effusion.").
* ``comparison-vs-findings``: a COMPARISON line that disagrees with FINDINGS or IMPRESSION
  ("Interval resolution of the effusion." beside "Small left pleural effusion.").
* ``impression-unsupported``: an IMPRESSION item (present or hedged) that no FINDINGS or COMPARISON
  sentence states; a diagnosis (pathology) is supported by any positive finding in a related
  anatomy ("Pneumonia." after "Right lower lobe consolidation.").

Callers may rely on: :meth:`ConsistencyChecker.check` never changes the draft;
:meth:`ConsistencyChecker.repair` returns a draft with no contradictions, made only by deleting
sentences (the negative side of a conflict, the comparison line, the unsupported impression item),
so every remaining sentence keeps its citations.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from retrieval.entities import Entity, EntityExtractor
from retrieval.rag.types import Draft, DraftSentence
from retrieval.records import Label
from retrieval.taxonomy import Taxonomy, default_taxonomy

# a normal statement that negates the key finding also rules out these in the same anatomy
_RULED_OUT: dict[str, frozenset[str]] = {
    "opacity": frozenset({"opacity", "consolidation", "nodule", "mass", "atelectasis", "pneumonia", "edema",
                          "interstitial pattern"}),
    "consolidation": frozenset({"opacity", "consolidation", "pneumonia"}),
    "cardiomegaly": frozenset({"cardiomegaly", "pericardial effusion"}),
    "fracture": frozenset({"fracture", "bone lesion"}),
}
_EXEMPT = re.compile(r"\b(otherwise|except|aside from|apart from|other than|but|remainder|elsewhere)\b", re.I)

SECTIONS = ("findings", "interval_changes", "impression")


@dataclass(frozen=True)
class Contradiction:
    """One problem: the rule, the two sentences involved (``second`` empty for an unsupported
    item) and the label it is about."""

    rule: str
    first: str
    second: str
    label: Label

    def __str__(self) -> str:
        tail = f" <> {self.second!r}" if self.second else ""
        return f"{self.rule}: {self.first!r}{tail} ({self.label})"


@dataclass(frozen=True)
class _Sent:
    section: str
    index: int  # position within the section
    text: str
    entities: tuple[Entity, ...]
    normals: tuple[tuple[str, frozenset[str]], ...]  # (anatomy, findings ruled out)


class ConsistencyChecker:
    def __init__(self, taxonomy: Taxonomy | None = None) -> None:
        self.tax = taxonomy or default_taxonomy()
        self.ex = EntityExtractor(self.tax)

    # ---- public ----------------------------------------------------------------------------
    def check(self, draft: Draft) -> list[Contradiction]:
        """Every contradiction in ``draft`` (an empty list for a consistent draft)."""
        return self.check_sections({name: [s.text for s in getattr(draft, name)] for name in SECTIONS})

    def check_text(self, report: str) -> list[Contradiction]:
        """A plain report (no sections; e.g. a radiologist's reference report): rules 1 and 2."""
        from retrieval.entities import split_sentences

        return self.check_sections({"findings": [s.text for s in split_sentences(report)]})

    def check_sections(self, sections: dict[str, list[str]]) -> list[Contradiction]:
        sents = [self._read(name, i, text) for name in SECTIONS for i, text in enumerate(sections.get(name, []))]
        out: list[Contradiction] = []
        seen: set[tuple[str, str, str]] = set()

        def add(rule: str, a: _Sent, b: _Sent | None, label: Label) -> None:
            # one contradiction per pair of sentences (a normal statement is also a negative)
            key = ("pair", a.text, b.text) if b is not None else (rule, a.text, label.finding)
            if key not in seen:
                seen.add(key)
                out.append(Contradiction(rule, a.text, b.text if b else "", label))

        for a in sents:
            for b in sents:
                if a is b:
                    continue
                for e in b.entities:
                    if e.negated:
                        continue
                    for anat, ruled in a.normals:
                        if e.finding in ruled and self._within(e.anatomy, anat):
                            add("normal-vs-finding", a, b, e.label)
                    for n in a.entities:
                        if n.negated and n.finding == e.finding and self._within(e.anatomy, n.anatomy):
                            rule = ("comparison-vs-findings" if "interval_changes" in (a.section, b.section)
                                    and a.section != b.section else "present-vs-absent")
                            add(rule, a, b, e.label)
        stated = [s for s in sents if s.section in ("findings", "interval_changes")]
        for s in sents:
            if s.section != "impression":
                continue
            for e in s.entities:
                if e.negated or self._supported(e, stated):
                    continue
                add("impression-unsupported", s, None, e.label)
        return out

    def repair(self, draft: Draft) -> tuple[Draft, list[Contradiction]]:
        """Delete sentences until ``draft`` is consistent; returns (repaired draft, what was found).

        Deletion order: the comparison line (also when it states the finding a FINDINGS normal
        statement rules out), the unsupported impression item, the normal statement or negative
        sentence; a positive finding in FINDINGS is never deleted in favour of a negative.
        """
        found = self.check(draft)
        cur = draft
        for _ in range(50):
            problems = self.check(cur)
            if not problems:
                break
            victim = self._victim(cur, problems[0])
            cur = _without(cur, victim)
        return cur, found

    # ---- internals -------------------------------------------------------------------------
    def _read(self, section: str, index: int, text: str) -> _Sent:
        ents = tuple(self.ex.extract(text))
        normals: list[tuple[str, frozenset[str]]] = []
        if not _EXEMPT.search(text):
            for anat, findings in self.ex.normal_statements(text):
                ruled = frozenset().union(*(_RULED_OUT.get(f, frozenset({f})) for f in findings))
                normals.append((anat, ruled))
        return _Sent(section, index, text, ents, tuple(normals))

    def _within(self, part: str, whole: str) -> bool:
        return part in self.tax.anatomies and whole in self.tax.anatomies and self.tax.is_within(part, whole)

    def _related(self, a: str, b: str) -> bool:
        return self._within(a, b) or self._within(b, a)

    def _supported(self, e: Entity, stated: list[_Sent]) -> bool:
        for s in stated:
            for f in s.entities:
                if f.negated or not self._related(f.anatomy, e.anatomy) and "chest" not in (f.anatomy, e.anatomy):
                    continue
                if f.finding == e.finding or e.kind == "pathology":
                    return True
        return False

    def _victim(self, draft: Draft, c: Contradiction) -> tuple[str, str]:
        """(section, text) of the sentence to delete for contradiction ``c``."""
        where = {s.text: name for name in SECTIONS for s in getattr(draft, name)}
        if c.rule == "impression-unsupported":
            return "impression", c.first
        if c.rule == "comparison-vs-findings":
            text = c.first if where.get(c.first) == "interval_changes" else c.second
            return "interval_changes", text
        # a comparison line never outranks FINDINGS: when one side is in COMPARISON, it goes
        if where.get(c.second) == "interval_changes" and where.get(c.first) != "interval_changes":
            return "interval_changes", c.second
        # normal-vs-finding and present-vs-absent: ``first`` is the normal / negative sentence
        return where.get(c.first, "findings"), c.first


def _without(draft: Draft, victim: tuple[str, str]) -> Draft:
    section, text = victim
    kept: list[DraftSentence] = [s for s in getattr(draft, section) if s.text != text]
    out = replace(draft)
    setattr(out, section, kept)
    return out

