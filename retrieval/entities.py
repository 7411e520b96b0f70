"""Mine a free-text radiology report into entities: (anatomy, finding, negated, uncertain, span).

A rule-based extractor in the NegEx / CheXpert-labeler tradition, over the vocabulary of
:mod:`retrieval.taxonomy`. Why rules and not a model: it runs anywhere with no weights, its
decisions can be read and fixed by a radiologist, and its precision/recall is measured on a
hand-checked set (``tests/fixtures/iu_xray_gold50.json``). Entities feed three things: payload
filters ("cases with a left effusion"), the report-mined similarity that defines ground truth for
retrieval evaluation (RadIR), and sentence tagging for drafting.

How a finding mention gets its attributes:

* **negated**: a negation cue ("no", "without", "negative for", "free of", ...) stands before it
  in the same clause, or a post-cue ("is not seen", "has resolved") follows it. A clause ends at
  "but", "however", ";" and similar, so "no effusion, but there is atelectasis" keeps the
  atelectasis. "No change"/"no interval change" are not negations.
* **uncertain**: a hedge ("may", "possible", "suspicious for", "worrisome for", "concerning for",
  "question of", "cannot be excluded", "versus", "and/or") in the clause, or a hedging predicate
  after the mention ("metastatic disease is possible", "atelectasis is suspected").
* **weak mentions**: costophrenic blunting stands for an effusion only when nothing else explains
  it: not when the sentence names the cause ("blunting ... represents pleural thickening") or an
  effusion itself, and not against an explicit "no effusion" elsewhere in the report.
* **devices and foreign bodies**: a density said to be a foreign body, or placed in the soft
  tissues, is not a lung opacity.
* **anatomy**: the nearest anatomy named in the clause when it lies in the finding's organ system
  ("left lower lobe atelectasis"), else the finding's default anatomy made lateral by a side word
  ("left effusion" -> left pleura, "bibasilar atelectasis" -> both lower lobes).
* Normal statements ("the lungs are clear", "heart size is normal") become negated entities.

Cost is linear in the report's length: every cue, side word and anatomy is looked for within
:data:`CONTEXT_CHARS` of a mention inside its clause (a clause-free 72 KB report used to cost
O(mentions x clause) and took 50-90 s), and reports longer than :data:`MAX_REPORT_CHARS` are
mined from their first :data:`MAX_REPORT_CHARS` characters with a logged warning (or
:class:`ReportTooLong` with ``strict=True``).
"""

from __future__ import annotations

import logging
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from dataclasses import dataclass

from retrieval.records import ABSENT, PRESENT, UNCERTAIN, Label, LabelKey, Status, Study, collapse
from retrieval.taxonomy import Taxonomy, default_taxonomy

log = logging.getLogger(__name__)

# A radiology report is a few KB (IU X-ray's longest is under 2 KB); 100,000 characters is far
# beyond any real one and still mined in about a second. Longer text is truncated (warning).
MAX_REPORT_CHARS = 100_000
# How far from a mention (inside its clause) cues, side words and anatomies are looked for. NegEx
# uses a few words; 400 characters is several sentences' worth and never changes a real report.
CONTEXT_CHARS = 400


class ReportTooLong(ValueError):
    """A report over :data:`MAX_REPORT_CHARS` given to ``extract(..., strict=True)``."""


@dataclass(frozen=True)
class Entity:
    """One finding stated about one anatomy in one sentence of a report."""

    anatomy: str
    finding: str
    kind: str  # "finding" or "pathology"
    negated: bool
    uncertain: bool
    sentence: int  # index of the sentence in the report
    span: tuple[int, int]  # character span of the mention in the report text

    @property
    def status(self) -> Status:
        if self.negated:
            return ABSENT
        return UNCERTAIN if self.uncertain else PRESENT

    @property
    def label(self) -> Label:
        return Label(self.anatomy, self.finding, self.status)


@dataclass(frozen=True)
class Sentence:
    index: int
    start: int
    end: int
    text: str


_NEG_PRE = re.compile(
    r"\b(no|not|without|negative for|free of|clear of|absence of|absent|rule out|ruled out|"
    r"resolution of|resolved|removal of|nor|neither)\b"
)
_PSEUDO_NEG = re.compile(
    r"\b(no (significant |definite |interval |appreciable |substantial )?change|not changed|"
    r"no longer|not only|without change|no increase|no decrease|not significantly changed)\b"
)
_NEG_POST = re.compile(
    r"\b((is|are|was|were|has been|have been) (not|no longer) (seen|identified|visualized|"
    r"present|evident|demonstrated|appreciated|visible|noted)|not (seen|identified|visualized|"
    r"present|evident|demonstrated|appreciated|visible)|(has|have) resolved|resolved|no longer"
    r"( seen| present| visible| identified)?|(is|are) absent|removed)\b"
)
_UNC = re.compile(
    r"\b(may|might|could|possible|possibly|probable|probably|likely|questionable|question of|"
    r"question|questioned|suspicious|suspect|suspected|suspicion|concern for|concerning for|"
    r"concerning|worrisome for|worrisome|raising the question|cannot be "
    r"(excluded|ruled out|entirely excluded)|can ?not (exclude|be excluded|rule out)|not (be )?"
    r"excluded|versus|vs|and/or|suggest|suggests|suggestive|suggesting|equivocal|indeterminate|"
    r"borderline|differential|consider|considered|presumably|presumed|"
    r"favor|favored|may represent|compatible with|consistent with|represent|represents|"
    r"either)\b"
)
# a hedging predicate after the mention, ending its clause: "metastatic disease is possible",
# "fracture is possible, if ...", "infiltrate is not excluded" (not "opacity is likely atelectasis",
# where the hedge belongs to the diagnosis that follows)
_UNC_POST = re.compile(
    r"^[^,;]*?\b(is|are|was|were|remains?|seems?|appears?|would be|could be|may be|might be)\s+"
    r"(also |more |most |less |quite |very |thought |felt |considered )?"
    r"(possible|possibly present|probable|likely|questionable|questioned|suspected|suspicious|"
    r"a possibility|a consideration|considered|not excluded|not entirely excluded|uncertain|"
    r"equivocal|indeterminate|in question)"
    r"(?=\s*($|[,;.?]|\b(given|if|in|on|at|with|but|although|clinically|and|as|though)\b))"
)
# "X is within (the upper) limits of normal": a normal statement about X, not a hedged X
_NEG_LIMITS = re.compile(
    r"^\s*((size|caliber|markings) )?(is |are |appears? |remains? |seems? )?(\w+ )?(at |near |within )"
    r"(the )?(upper )?(limits of normal|normal limits|limit of normal)"
)
# blunting is an indirect sign of effusion; these findings named in the same sentence explain it
_BLUNT = re.compile(r"\bblunt")
_BLUNT_CAUSES = {"pleural thickening", "scarring", "atelectasis", "opacity", "consolidation"}
# density-like findings that a foreign body or a soft-tissue location turns into "not lung"
_DENSITY_FINDINGS = {"opacity", "nodule", "mass", "calcification"}
_CLAUSE_BREAK = re.compile(
    r"\b(but|however|although|though|except|whereas|while|otherwise|which|aside from|"
    r"apart from)\b|;|:|,? and (there|the|a|an|mild|moderate|small|large|new)\b|, (there|the)\b"
)
_SIDE = re.compile(r"\b(left|right|bilateral(ly)?|bibasilar|bibasal|bibasilarly|both)\b")
_SENT_END = re.compile(r"(?<!\d)\.(?!\d)|\n+|\?|!|(?:^|\s)\d\.\s")

# "compatible with", "consistent with" and "represent" are hedges only mildly; they mark the
# *diagnosis* uncertain in IU X-ray style ("opacity may represent atelectasis") but a bare
# "consistent with" often states a firm finding. They count as uncertainty only after the
# first finding of a clause (the diagnosis position).
_SOFT_HEDGES = {"compatible with", "consistent with", "represent", "represents"}


def split_sentences(report: str) -> list[Sentence]:
    """Split at full stops (not decimal points), line breaks and list numbers ("1. ")."""
    out: list[Sentence] = []
    pos = 0
    for m in _SENT_END.finditer(report + "."):
        seg_end = min(m.start(), len(report))
        text = report[pos:seg_end]
        stripped = text.strip()
        if stripped and re.search(r"[a-zA-Z]", stripped):
            start = pos + (len(text) - len(text.lstrip()))
            out.append(Sentence(len(out), start, start + len(stripped), stripped))
        pos = m.end()
    return out


class EntityExtractor:
    """Turns report text into :class:`Entity` lists; build once and reuse (patterns compile)."""

    def __init__(self, taxonomy: Taxonomy | None = None) -> None:
        self.tax = taxonomy or default_taxonomy()
        self._findings = [
            (f.name, re.compile(r"\b(" + "|".join(f.patterns) + r")\b"))
            for f in self.tax.findings.values()
        ]
        self._anatomies = [
            (a.name, re.compile(r"\b(" + "|".join(a.patterns) + r")\b"))
            for a in self.tax.anatomies.values()
        ]

    # ---- public ----------------------------------------------------------------------------
    def extract(self, report: str | None, *, strict: bool = False) -> list[Entity]:
        """All entities of ``report``; an empty or missing report gives an empty list.

        Above :data:`MAX_REPORT_CHARS` only the first :data:`MAX_REPORT_CHARS` characters are
        mined and a warning is logged (the length only, never text); with ``strict`` it raises
        :class:`ReportTooLong` instead.
        """
        if not report or not report.strip():
            return []
        if len(report) > MAX_REPORT_CHARS:
            if strict:
                raise ReportTooLong(f"report of {len(report)} characters exceeds the {MAX_REPORT_CHARS}-character limit")
            log.warning("report of %d characters: entities mined from the first %d only", len(report), MAX_REPORT_CHARS)
            report = report[:MAX_REPORT_CHARS]
        lower = report.lower()
        out: list[Entity] = []
        weak: set[int] = set()  # ids of weak (indirect) mentions
        for sent in split_sentences(report):
            out.extend(self._sentence(lower, sent, weak))
        return _dedupe(self._drop_overruled(out, weak))

    def sentence_entities(self, report: str | None) -> list[tuple[Sentence, list[Entity]]]:
        """Each sentence with the entities stated in it (for drafting and highlighting)."""
        report = (report or "")[:MAX_REPORT_CHARS]
        by_sentence: dict[int, list[Entity]] = {}
        for e in self.extract(report):
            by_sentence.setdefault(e.sentence, []).append(e)
        return [(s, by_sentence.get(s.index, [])) for s in split_sentences(report)]

    def normal_statements(self, text: str) -> list[tuple[str, tuple[str, ...]]]:
        """The normal statements in ``text`` ("the lungs are clear"): (anatomy, findings stated
        absent) each, for checks that need to know a negative was a blanket normal statement."""
        lower = text.lower()
        out = []
        for ns in self.tax.normal_statements:
            for m in ns.pattern.finditer(lower):
                where = self._normal_anatomy(m)
                if where is not None:
                    out.append((where, ns.findings))
        return out

    # ---- internals -------------------------------------------------------------------------
    def _drop_overruled(self, ents: list[Entity], weak: set[int]) -> list[Entity]:
        """An explicit negative ("no pleural effusion") is not overruled by a weak mention of the
        same finding (costophrenic blunting) at that anatomy or below it."""
        if not weak:
            return ents
        tax = self.tax
        explicit_absent = {(e.finding, e.anatomy) for e in ents if e.negated and id(e) not in weak}

        def overruled(e: Entity) -> bool:
            return any(f == e.finding and tax.is_within(e.anatomy, a) for f, a in explicit_absent)

        return [e for e in ents if id(e) not in weak or e.negated or not overruled(e)]

    def _sentence(self, lower: str, sent: Sentence, weak: set[int] | None = None) -> list[Entity]:
        text = lower[sent.start : sent.end]
        finds = _longest(_matches(self._findings, text))
        find_spans = _Spans(finds)
        anats = [a for a in _longest(_matches(self._anatomies, text)) if not find_spans.overlaps(a[1], a[2])]
        anat_starts = [a[1] for a in anats]
        find_starts = [f[1] for f in finds]
        clauses = _clauses(text)
        clause_starts = [a for a, _ in clauses]
        names = {n for n, _, _ in finds}
        foreign = "foreign body" in names
        # spans naming a cause of blunting (or an effusion itself), once per sentence
        causes = {(a, b) for n, a, b in finds
                  if n in _BLUNT_CAUSES or (n == "effusion" and not _BLUNT.search(text[a:b]))}
        out: list[Entity] = []
        for name, s, e in finds:
            mention = text[s:e]
            is_weak = name == "effusion" and bool(_BLUNT.search(mention))
            if is_weak and causes - {(s, e)}:
                continue  # "blunting ... represents pleural thickening": the cause is stated
            if name in _DENSITY_FINDINGS and foreign:
                continue  # "metallic density ..., a foreign body": not a lung finding
            i = bisect_right(clause_starts, s) - 1
            c0, c1 = clauses[i] if i >= 0 and s < clauses[i][1] else (0, len(text))
            # cues count within CONTEXT_CHARS of the mention only: linear time on clause-free text
            c0, c1 = max(c0, s - CONTEXT_CHARS), min(c1, e + CONTEXT_CHARS)
            clause = text[c0:c1]
            before, after = text[c0:s], text[e:c1]
            negated = (_negated(before, after) or bool(_NEG_LIMITS.match(after))
                       or bool(re.search(r"\bnot\b", mention)))  # "the heart is not enlarged"
            uncertain = _uncertain(before, after, clause,
                                   first=bisect_left(find_starts, c0) >= bisect_left(find_starts, s))
            f = self.tax.findings[name]
            near = anats[bisect_left(anat_starts, c0):bisect_left(anat_starts, c1)]
            places = self._place(f.anatomy, s, e, text, c0, c1, near)
            if name in _DENSITY_FINDINGS and any(self.tax.is_within(p, "soft tissues") for p in places):
                continue  # a density in the soft tissues is not a lung finding
            for anatomy in places:
                ent = Entity(anatomy, name, f.kind, negated, uncertain and not negated,
                             sent.index, (sent.start + s, sent.start + e))
                out.append(ent)
                if is_weak and weak is not None:
                    weak.add(id(ent))
        for ns in self.tax.normal_statements:
            for m in ns.pattern.finditer(text):
                where = self._normal_anatomy(m)
                if where is None:
                    continue
                for fname in ns.findings:
                    f = self.tax.findings[fname]
                    out.append(Entity(where, fname, f.kind, True, False, sent.index,
                                      (sent.start + m.start(), sent.start + m.end())))
        return out

    def _normal_anatomy(self, m: re.Match[str]) -> str | None:
        group = m.groupdict().get("anat")
        if not group:
            return None
        for name, rx in self._anatomies:
            if rx.fullmatch(group.strip()):
                return name
        if "lung" in group:
            return self.tax.lateral("lung", "left") if group.startswith("left") else (
                self.tax.lateral("lung", "right") if group.startswith("right") else "lung")
        if "card" in group or "heart" in group:
            return "heart"
        return None

    def _place(self, default: str, s: int, e: int, text: str, c0: int, c1: int,
               anats: list[tuple[str, int, int]]) -> list[str]:
        tax = self.tax
        near = [a for a in anats if c0 <= a[1] < c1]  # callers pass the clause's anatomies already
        place = default
        # a side word or another system's lateral part across a comma belongs to another list item
        sides = [(m.group(1), m.start() + c0, m.end() + c0) for m in _SIDE.finditer(text[c0:c1])
                 if not _across_comma(text, (m.group(1), m.start() + c0, m.end() + c0), s, e)]
        side_d = min((_dist(m, s, e) for m in sides), default=None)
        if near:
            nearest = min(near, key=lambda a: _dist(a, s, e))
            name = nearest[0]
            if tax.is_within(name, default) or default == "chest" or _system(tax, name) == _system(tax, default):
                place = name
            elif name in ("soft tissues", "upper abdomen") and default == "lung" and _dist(nearest, s, e) < 40:
                return [name]  # "nodule in the breast", "granuloma in the spleen"
            elif (side_d is not None and side_d < _dist(nearest, s, e)) or _across_comma(text, nearest, s, e):
                pass  # "bilateral granulomas ... right pleural thickening": the side word is nearer
            else:
                side = tax.anatomies[name].side
                if side and tax.lateral(default, side) != default:
                    return [tax.lateral(default, side)]
        if tax.anatomies[place].side:
            return [place]
        if sides:
            word = min(sides, key=lambda m: _dist(m, s, e))[0]
            if word in ("left", "right"):
                return [tax.lateral(place, word)]
            if word.startswith("bibas") and place == "lung":
                return ["left lower lobe", "right lower lobe"]
            both = [tax.lateral(place, "left"), tax.lateral(place, "right")]
            if both[0] != place:
                return both
        return [place]


def _system(tax: Taxonomy, name: str) -> str:
    """The anatomy just below the root: the organ system a part belongs to."""
    chain = tax.ancestors(name)
    return chain[-2] if len(chain) >= 2 else chain[-1]


def _matches(table: Iterable[tuple[str, re.Pattern[str]]], text: str) -> list[tuple[str, int, int]]:
    return [(name, m.start(), m.end()) for name, rx in table for m in rx.finditer(text)]


def _longest(hits: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Keep the longest of overlapping matches ("pleural thickening" over "thickening").

    Matches with the same span are all kept (two findings named by one phrase)."""
    kept: list[tuple[str, int, int]] = []
    spans = _Spans([])
    for h in sorted(hits, key=lambda h: (-(h[2] - h[1]), h[1])):
        if not spans.overlaps(h[1], h[2], same_ok=True):
            kept.append(h)
            spans.add(h[1], h[2])
    return sorted(kept, key=lambda h: h[1])


class _Spans:
    """Non-overlapping (start, end) spans, sorted, with an O(log n) overlap test."""

    def __init__(self, items: list[tuple[str, int, int]]) -> None:
        self.spans = sorted({(s, e) for _, s, e in items})
        self.ends = [e for _, e in self.spans]

    def add(self, s: int, e: int) -> None:
        i = bisect_left(self.spans, (s, e))
        if i < len(self.spans) and self.spans[i] == (s, e):
            return
        self.spans.insert(i, (s, e))
        self.ends.insert(i, e)

    def overlaps(self, s: int, e: int, same_ok: bool = False) -> bool:
        # spans are disjoint (or equal), so ends rise with starts: the first span ending after s
        # is the only candidate, plus the one after it when that first one is (s, e) itself
        i = bisect_right(self.ends, s)
        for ks, ke in self.spans[i:i + 2]:
            if ks >= e:
                return False
            if not (same_ok and (ks, ke) == (s, e)):
                return True
        return False


def _overlaps(a: tuple[str, int, int], others: list[tuple[str, int, int]]) -> bool:
    return any(a[1] < o[2] and o[1] < a[2] for o in others)


def _dist(a: tuple[str, int, int], s: int, e: int) -> int:
    return max(0, a[1] - e, s - a[2])


def _across_comma(text: str, a: tuple[str, int, int], s: int, e: int) -> bool:
    lo, hi = (a[2], s) if a[2] <= s else (e, a[1])
    return "," in text[lo:hi]


def _clauses(text: str) -> list[tuple[int, int]]:
    cuts = [0] + [m.start() for m in _CLAUSE_BREAK.finditer(text)] + [len(text)]
    return [(a, b) for a, b in zip(cuts, cuts[1:], strict=False) if b > a]


def _negated(before: str, after: str) -> bool:
    pre = _PSEUDO_NEG.sub(" ", before)
    if _NEG_PRE.search(pre):
        return True
    post = re.split(r",|\band\b", after, maxsplit=1)[0]
    return bool(_NEG_POST.search(post))


def _uncertain(before: str, after: str, clause: str, first: bool) -> bool:
    if _UNC_POST.match(after):
        return True
    for m in _UNC.finditer(clause):
        cue = m.group(1)
        if cue in ("versus", "vs", "and/or", "either"):
            return True
        in_before = m.end() <= len(before)
        if m.start() < len(clause) - len(after) and m.end() > len(before):
            return True  # the hedge is part of the mention ("upper limits of normal")
        if cue in _SOFT_HEDGES:
            if in_before and not first:
                return True
            continue
        if cue.startswith(("cannot", "can not", "cannot", "not ", "suspected", "questioned")):
            if not in_before:  # post-cue: "effusion cannot be excluded"
                return True
            continue
        if in_before:
            return True
    return False


def _dedupe(ents: list[Entity]) -> list[Entity]:
    seen: dict[tuple[str, str, int, bool, bool], Entity] = {}
    for e in ents:
        seen.setdefault((e.anatomy, e.finding, e.sentence, e.negated, e.uncertain), e)
    return list(seen.values())


def study_labels(study: Study, extractor: EntityExtractor) -> dict[LabelKey, Status]:
    """A study's labels: its ground-truth labels when a labelled source gave them (each a present
    finding at the finding's home anatomy), else those mined from its report."""
    if study.labels is not None:
        tax = extractor.tax
        found = (tax.finding(name) for name in study.labels)
        return collapse(Label(f.anatomy, f.name, PRESENT) for f in found)
    return report_labels(extractor.extract(study.report))


def coarse_labels(entities: Iterable[Entity], tax: Taxonomy) -> dict[LabelKey, Status]:
    """Like :func:`report_labels`, with each anatomy raised to its coarse level first."""
    return collapse(Label(tax.coarse(e.anatomy), e.finding, e.status) for e in entities)


def report_labels(entities: Iterable[Entity]) -> dict[LabelKey, Status]:
    """One status per (anatomy, finding) for the whole report (:func:`retrieval.records.collapse`)."""
    return collapse(e.label for e in entities)
