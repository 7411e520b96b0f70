"""The prompt every model generator sees, and parsing a model's text back into a cited draft.

Models are asked to cite reference case ids in square brackets. What comes back is checked:
only ids that were in the context count, and a sentence without a valid citation is cited
post hoc with the retrieved cases whose reports agree with every entity it states. A sentence
that no case supports stays uncited, and is shown as such, never silently attributed. The parsed
draft is read back by the consistency checker; what it finds is listed on the draft
(``Draft.contradictions``, rendered under CHECK), not silently edited out of a model's text.

The prompt carries the query images (current, prior, reference images), each reference report with
its similarity score, the prior report, and the reference cases' score-weighted entity consensus.
"""

from __future__ import annotations

import re

from retrieval.rag.context import ContextBuilder, agreeing_cases
from retrieval.rag.types import Draft, DraftContext, DraftSentence

SYSTEM = ("You draft chest radiograph reports for a radiologist to review. Use only what the images "
          "and the reference cases support. Cite reference case ids in square brackets after each sentence.")
_SECTION = re.compile(r"^\s*(findings|impression|comparison|interval change)\s*:?\s*$|^\s*(findings|impression|comparison)\s*:\s*",
                      re.IGNORECASE | re.MULTILINE)
_CITE = re.compile(r"\[([^\[\]]{1,200})\]")


def build_prompt(ctx: DraftContext, n_current: int = 1, n_prior: int = 0, reference_ids: list[str] | None = None) -> str:
    lines = []
    idx = 1
    if n_current:
        lines.append(f"Image{'s' if n_current > 1 else ''} {idx}{f'-{idx + n_current - 1}' if n_current > 1 else ''}: "
                     "the current study.")
        idx += n_current
    if n_prior:
        lines.append(f"Image {idx}: the prior study of the same patient.")
        idx += n_prior
    for sid in reference_ids or []:
        lines.append(f"Image {idx}: reference case [{sid}].")
        idx += 1
    lines.append("Reference cases, most similar first:")
    for c in ctx.cases:
        lines.append(f"[{c.study_id}] (similarity {c.score:.2f}): " + " ".join(s.text for s in c.sentences))
    consensus = consensus_lines(ctx)
    if consensus:
        lines.append("Entity consensus of the reference cases (score-weighted vote): " + "; ".join(consensus) + ".")
    if ctx.prior is not None:
        lines.append(f"Prior report [prior:{ctx.prior.study_id}]"
                     f"{' (' + ctx.prior.study_date + ')' if ctx.prior.study_date else ''}: {ctx.prior.report}")
    focus = " ".join(x for x in (ctx.anatomy, ctx.finding) if x)
    if focus:
        lines.append(f"Pay particular attention to: {focus}.")
    lines.append("Write a FINDINGS section and an IMPRESSION section"
                 + (", and a COMPARISON section stating what is new, resolved, improved, worsened or "
                    "unchanged against the prior" if ctx.prior is not None else "")
                 + ". End every sentence with the supporting case ids in square brackets, e.g. [id1, id2].")
    return "\n".join(lines)


def consensus_lines(ctx: DraftContext) -> list[str]:
    """The score-weighted vote of the reference cases, one "finding (anatomy): status" each."""
    from retrieval.rag.extractive import ExtractiveGenerator

    decided = ExtractiveGenerator(check=False).decide(ctx)
    return [f"{k.finding} ({k.anatomy}): {st}" for k, st in sorted(decided.items())]


def parse_generated(text: str, ctx: DraftContext, generator: str) -> Draft:
    draft = Draft.for_context(ctx, generator)
    known = {c.study_id for c in ctx.cases} | ({f"prior:{ctx.prior.study_id}"} if ctx.prior else set())
    builder = ContextBuilder()
    section = "findings"
    parts = _SECTION.split(text)
    # re.split with groups yields [pre, g1, g2, body, g1, g2, body, ...]
    chunks = [("findings", parts[0])]
    for i in range(1, len(parts) - 2, 3):
        name = (parts[i] or parts[i + 1] or "findings").lower()
        chunks.append((name, parts[i + 2]))
    for name, body in chunks:
        section = "interval_changes" if name in ("comparison", "interval change") else name
        for raw in re.split(r"(?<=[.!?])\s+(?!\[)|\n+", body or ""):
            cites = [c.strip() for m in _CITE.finditer(raw) for c in m.group(1).split(",")]
            sentence = _CITE.sub("", raw).strip(" -*\t")
            if not re.search(r"[A-Za-z]{2}", sentence):
                continue
            valid = tuple(dict.fromkeys(c for c in cites if c in known))
            labels = tuple(lab for s in builder.sentences("gen", sentence) for lab in s.labels)
            if not valid and labels:
                valid = tuple(agreeing_cases(ctx.cases, labels))
            getattr(draft, section if section in ("findings", "impression", "interval_changes") else "findings").append(
                DraftSentence(sentence, valid, labels))
    from retrieval.rag.consistency import ConsistencyChecker

    draft.contradictions = [str(c) for c in ConsistencyChecker(builder.tax).check(draft)]
    return draft
