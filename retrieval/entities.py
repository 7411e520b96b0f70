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
* **uncertain**: a hedge ("may", "possible", "suspicious for", "cannot be excluded", "versus",
  "and/or") in the clause.
* **anatomy**: the nearest anatomy named in the clause when it lies in the finding's organ system
  ("left lower lobe atelectasis"), else the finding's default anatomy made lateral by a side word
  ("left effusion" -> left pleura, "bibasilar atelectasis" -> both lower lobes).
* Normal statements ("the lungs are clear", "heart size is normal") become negated entities.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from retrieval.taxonomy import Taxonomy, default_taxonomy

PRESENT, ABSENT, UNCERTAIN = "present", "absent", "uncertain"


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
    def status(self) -> str:
        if self.negated:
            return ABSENT
        return UNCERTAIN if self.uncertain else PRESENT


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
    r"questioned|suspicious|suspect|suspected|suspicion|concern for|concerning for|cannot be "
    r"(excluded|ruled out|entirely excluded)|can ?not (exclude|be excluded|rule out)|not (be )?"
    r"excluded|versus|vs|and/or|suggest|suggests|suggestive|suggesting|equivocal|indeterminate|"
    r"borderline|upper limits? of normal|differential|consider|considered|presumably|presumed|"
    r"favor|favored|may represent|compatible with|consistent with|represent|represents|"
    r"either)\b"
)
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
    def extract(self, report: str | None) -> list[Entity]:
        """All entities of ``report``; an empty or missing report gives an empty list."""
        if not report or not report.strip():
            return []
        lower = report.lower()
        out: list[Entity] = []
        for sent in split_sentences(report):
            out.extend(self._sentence(lower, sent))
        return _dedupe(out)

    def sentence_entities(self, report: str | None) -> list[tuple[Sentence, list[Entity]]]:
        """Each sentence with the entities stated in it (for drafting and highlighting)."""
        ents = self.extract(report)
        return [(s, [e for e in ents if e.sentence == s.index]) for s in split_sentences(report or "")]

    # ---- internals -------------------------------------------------------------------------
    def _sentence(self, lower: str, sent: Sentence) -> list[Entity]:
        text = lower[sent.start : sent.end]
        finds = _longest(_matches(self._findings, text))
        anats = [a for a in _longest(_matches(self._anatomies, text)) if not _overlaps(a, finds)]
        clauses = _clauses(text)
        out: list[Entity] = []
        for name, s, e in finds:
            c0, c1 = next(((a, b) for a, b in clauses if a <= s < b), (0, len(text)))
            clause = text[c0:c1]
            before, after = text[c0:s], text[e:c1]
            negated = _negated(before, after)
            uncertain = _uncertain(before, after, clause, first=not any(
                c0 <= fs < s for _, fs, _ in finds))
            f = self.tax.findings[name]
            for anatomy in self._place(f.anatomy, s, e, text, c0, c1, anats):
                out.append(Entity(anatomy, name, f.kind, negated, uncertain and not negated,
                                  sent.index, (sent.start + s, sent.start + e)))
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
        near = [a for a in anats if c0 <= a[1] < c1]
        place = default
        if near:
            name = min(near, key=lambda a: _dist(a, s, e))[0]
            if tax.is_within(name, default) or default == "chest" or _system(tax, name) == _system(tax, default):
                place = name
            else:
                side = tax.anatomies[name].side
                if side and tax.lateral(default, side) != default:
                    return [tax.lateral(default, side)]
        if tax.anatomies[place].side:
            return [place]
        sides = [(m.group(1), m.start(), m.end()) for m in _SIDE.finditer(text[c0:c1])]
        if sides:
            word = min(sides, key=lambda m: _dist(m, s - c0, e - c0))[0]
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
    """Keep the longest of overlapping matches ("pleural thickening" over "thickening")."""
    kept: list[tuple[str, int, int]] = []
    for h in sorted(hits, key=lambda h: (-(h[2] - h[1]), h[1])):
        if not any(h[1] < k[2] and k[1] < h[2] for k in kept):
            kept.append(h)
    return sorted(kept, key=lambda h: h[1])


def _overlaps(a: tuple[str, int, int], others: list[tuple[str, int, int]]) -> bool:
    return any(a[1] < o[2] and o[1] < a[2] for o in others)


def _dist(a: tuple[str, int, int], s: int, e: int) -> int:
    return max(0, a[1] - e, s - a[2])


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


def report_labels(entities: Iterable[Entity]) -> dict[tuple[str, str], str]:
    """Collapse entities to one status per (anatomy, finding) for the whole report.

    A finding stated present anywhere wins over uncertain, which wins over absent: reports often
    say "no effusion on the right" and "small left effusion" in the same breath, and a normal
    statement ("lungs are clear") must not erase a specific positive one.
    """
    rank = {ABSENT: 0, UNCERTAIN: 1, PRESENT: 2}
    out: dict[tuple[str, str], str] = {}
    for e in entities:
        key = (e.anatomy, e.finding)
        if key not in out or rank[e.status] > rank[out[key]]:
            out[key] = e.status
    return out
