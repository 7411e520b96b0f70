"""The structured drafter: sentences rendered from the findings table, in radiology style.

Why templates and not retrieved sentences: a retrieved sentence carries its patient with it (a
side, a size in centimetres, an age, a history, a CT finding); rendering from the typed table
says only what the evidence supports, on the side the query's own evidence gives, and every
sentence carries that evidence (the image reading's probability, the agreeing cases and their
scores). FINDINGS goes anatomy by anatomy (lungs, pleura, heart, mediastinum); normal statements
are made only where every finding of that anatomy reads absent; IMPRESSION lists what is present
or hedged, or says there is no acute abnormality; COMPARISON comes from the two studies of the
patient (:func:`retrieval.rag.findings.compare`).
"""

from __future__ import annotations

from retrieval.encoders.reading import Side
from retrieval.rag.findings import ChangeRow, FindingRow
from retrieval.rag.types import (
    NOTHING_TO_DRAFT,
    Draft,
    DraftContext,
    DraftImages,
    DraftSentence,
    Evidence,
)
from retrieval.records import ABSENT, PRESENT, Label, LabelKey

PHRASES = {
    "effusion": "pleural effusion", "pneumothorax": "pneumothorax", "atelectasis": "atelectasis",
    "consolidation": "consolidation", "edema": "pulmonary edema", "mass": "pulmonary mass",
    "nodule": "pulmonary nodule", "opacity": "pulmonary opacity", "pneumonia": "pneumonia",
    "emphysema": "emphysema", "scarring": "scarring", "hiatal hernia": "hiatal hernia",
    "pleural thickening": "pleural thickening", "cardiomegaly": "cardiomegaly",
}
ANATOMY_ORDER = ("lung", "pleura", "heart", "mediastinum")
NORMAL_SENTENCE = {"lung": "The lungs are clear.", "heart": "Heart size is normal.",
                   "mediastinum": "The mediastinal contours are normal."}
MAX_CASES_CITED = 5


def phrase(key: LabelKey, side: Side | None) -> str:
    base = PHRASES.get(key.finding, key.finding)
    if side is None:
        return base
    if side == "bilateral":
        return f"bilateral {base}s" if key.finding in ("effusion", "nodule", "mass") else f"bilateral {base}"
    if key.anatomy == "lung":
        return f"{base} in the {side} lung"
    return f"{side} {base}"


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _evidence(rows: list[FindingRow], prior: str | None = None) -> Evidence:
    image = tuple((f"{r.key.anatomy}|{r.key.finding}", round(r.image.probability, 3)) for r in rows if r.image)
    cases: dict[str, float] = {}
    for r in rows:
        for c in r.agreeing():
            cases.setdefault(c.study_id, round(c.score, 3))
    top = tuple(sorted(cases.items(), key=lambda kv: -kv[1])[:MAX_CASES_CITED])
    return Evidence(image, top, prior)


def _sentence(text: str, rows: list[FindingRow]) -> DraftSentence:
    ev = _evidence(rows)
    labels = tuple(sorted(Label(r.key.anatomy, r.key.finding, r.status) for r in rows))
    cites = (*(("image",) if ev.image else ()), *(sid for sid, _ in ev.cases))
    return DraftSentence(text, cites, labels, None, ev)


def positive_sentence(row: FindingRow) -> str:
    if row.key.finding == "cardiomegaly" and row.side is None:
        return "The heart is enlarged." if row.status == PRESENT else "Possible cardiomegaly."
    text = phrase(row.key, row.side)
    return _cap(text) + "." if row.status == PRESENT else f"Possible {text}."


def _absent_sentence(anatomy: str, rows: list[FindingRow], all_absent: bool) -> str | None:
    if all_absent and anatomy in NORMAL_SENTENCE:
        return NORMAL_SENTENCE[anatomy]
    names = [PHRASES.get(r.key.finding, r.key.finding) for r in rows if r.key.finding != "cardiomegaly"]
    if anatomy == "heart":
        return "Heart size is normal." if any(r.key.finding == "cardiomegaly" for r in rows) else None
    if not names:
        return None
    names = sorted(set(names), key=names.index)
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"No {listed}."


def change_sentence(ch: ChangeRow) -> str:
    text = phrase(ch.key, ch.side)
    if ch.change == "new":
        return f"Possibly new {text}; the difference from the prior is within the reading's noise." if ch.hedged \
            else f"New {text} since the prior study."
    if ch.change == "resolved":
        return (f"Possible interval resolution of {text}; compare directly with the prior."
                if ch.hedged else f"Interval resolution of {text}.")
    if ch.change in ("increased", "decreased"):
        return f"Possibly {ch.change} {text}." if ch.hedged else f"{_cap(ch.change)} {text}."
    return f"{_cap(text)}, not clearly changed from the prior." if ch.hedged else f"Unchanged {text}."


class StructuredGenerator:
    """Renders ``ctx.table`` (built by :func:`retrieval.rag.draft.draft_report`)."""

    name = "structured"

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        draft = Draft.for_context(ctx, self.name)
        table = ctx.table
        if table is None or table.empty:
            draft.status, draft.reason = "nothing_to_draft", NOTHING_TO_DRAFT
            return draft
        draft.table = table
        by_anatomy: dict[str, list[FindingRow]] = {}
        for r in table.rows:
            by_anatomy.setdefault(r.key.anatomy, []).append(r)
        order = [a for a in ANATOMY_ORDER if a in by_anatomy] + [a for a in by_anatomy if a not in ANATOMY_ORDER]
        for anatomy in order:
            rows = by_anatomy[anatomy]
            positive = [r for r in rows if r.status != ABSENT]
            for r in sorted(positive, key=lambda r: (r.status != PRESENT, -r.probability)):
                draft.findings.append(_sentence(positive_sentence(r), [r]))
            absent = [r for r in rows if r.status == ABSENT and r.image is not None]  # read, not just unvoted
            if absent:
                text = _absent_sentence(anatomy, absent, all_absent=not positive)
                if text:
                    draft.findings.append(_sentence(text, absent))
        prior = table.prior_study
        for ch in table.changes:
            row = table.row(ch.key)
            ev = Evidence(tuple((f"{ch.key.anatomy}|{ch.key.finding}", round(p, 3))
                                for p in ([ch.current] if ch.current is not None else [])), (), prior)
            status = row.status if row is not None else ABSENT
            draft.interval_changes.append(DraftSentence(
                change_sentence(ch), ("image", *((f"prior:{prior}",) if prior else ())),
                (Label(ch.key.anatomy, ch.key.finding, status),), ch.change, ev))
        positives = sorted(table.positive(), key=lambda r: (r.status != PRESENT, -r.probability))
        if positives:
            draft.impression = [_sentence(positive_sentence(r), [r]) for r in positives]
        else:
            read = [r for r in table.rows if r.image is not None or r.vote is not None]
            draft.impression = [_sentence("No acute cardiopulmonary abnormality.", read)]
        return draft


__all__ = ["StructuredGenerator", "change_sentence", "phrase", "positive_sentence"]
