"""Build the drafting context: retrieved cases (entity-tagged sentences), the prior, a budget.

Sentences are tagged with the entities they state (coarse anatomy, as in evaluation), exact
duplicates across cases are kept once (the first, most similar, case keeps it), and cases are
added in rank order until the token budget is spent, so a long report cannot crowd out the
others and a prompt always fits a model's context.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from retrieval.entities import EntityExtractor, coarse_labels
from retrieval.rag.types import (
    ContextCase,
    ContextSentence,
    Draft,
    DraftContext,
    DraftSentence,
    PriorStudy,
)
from retrieval.records import Label, LabelKey, Status
from retrieval.taxonomy import Taxonomy, default_taxonomy

_NOISE = re.compile(r"\bxxxx\b", re.IGNORECASE)


def approx_tokens(text: str) -> int:
    return int(len(text.split()) * 1.3) + 1


def labels_of(report: str | None, ex: EntityExtractor, tax: Taxonomy) -> dict[LabelKey, Status]:
    """A report's labels collapsed at the coarse anatomy level (what drafting compares)."""
    return coarse_labels(ex.extract(report), tax)


def agreeing_cases(cases: Sequence[ContextCase], labels: Sequence[Label]) -> list[str]:
    """Ids of the cases whose reports state every label the same way: the cases a sentence with
    those labels can cite."""
    return [c.study_id for c in cases if all(c.labels.get(lab.key) == lab.status for lab in labels)]


class ContextBuilder:
    def __init__(self, token_budget: int = 1500, taxonomy: Taxonomy | None = None) -> None:
        self.budget = token_budget
        self.tax = taxonomy or default_taxonomy()
        self.ex = EntityExtractor(self.tax)

    def sentences(self, study_id: str, report: str) -> tuple[ContextSentence, ...]:
        out = []
        for sent, ents in self.ex.sentence_entities(report):
            labels = sorted({Label(self.tax.coarse(e.anatomy), e.finding, e.status) for e in ents})
            out.append(ContextSentence(sent.text.rstrip(".") + ".", study_id, tuple(labels)))
        return tuple(out)

    def build(self, cases: Sequence[tuple[str, float, str | None]], prior: tuple[str, str, str | None] | None = None,
              anatomy: str | None = None, finding: str | None = None) -> DraftContext:
        """``cases``: (study_id, score, report) in rank order; ``prior``: (study_id, report, date)."""
        seen: set[str] = set()
        kept: list[ContextCase] = []
        used = 0
        for sid, score, report in cases:
            if not report or not report.strip():
                continue
            sents = []
            for s in self.sentences(sid, report):
                key = _NOISE.sub("", s.text.lower()).strip()
                if key in seen:
                    continue
                seen.add(key)
                sents.append(s)
            cost = sum(approx_tokens(s.text) for s in sents)
            if kept and used + cost > self.budget:
                break
            used += cost
            kept.append(ContextCase(sid, float(score), report, labels_of(report, self.ex, self.tax), tuple(sents)))
        pri = None
        if prior is not None and prior[1] and prior[1].strip():
            pri = PriorStudy(prior[0], prior[1], labels_of(prior[1], self.ex, self.tax), prior[2])
        return DraftContext(tuple(kept), pri, anatomy, finding, used)


def copy_report(case: ContextCase, generator: str, builder: ContextBuilder | None = None) -> Draft:
    """A draft that is ``case``'s report verbatim, each sentence citing that case (the copy
    baselines: copy-nearest, copy-mbr)."""
    builder = builder or ContextBuilder()
    draft = Draft(generator=generator)
    draft.cases_used = [{"study_id": case.study_id, "score": round(case.score, 4)}]
    draft.findings = [DraftSentence(s.text, (case.study_id,), s.labels)
                      for s in builder.sentences(case.study_id, case.report)]
    return draft
