"""The extractive drafter (CXR-RePaiR style): no model, runs anywhere, every sentence cited.

1. **Vote** on each (anatomy, finding) stated in the retrieved reports, weighting each case by its
   retrieval score; a case silent about a finding counts as a full vote for "absent" (radiologists
   leave normal structures unmentioned). The vote decides present / uncertain / absent.
   Thresholds were tuned on the IU X-ray *train* split (present >= 0.5, uncertain >= 0.35) and
   reported on the validation split, never tuned there.
2. **Select** sentences greedily by support (sum of weights of the cases that agree with every
   entity the sentence states), covering the decided findings in anatomical order. A sentence
   that states any entity against the decision is never used: no "no effusion" beside
   "small effusion".
3. **Cite** each sentence with every retrieved case that agrees with it (not only its source).
4. **Impression**: the present findings, or the best-supported normal statement when none.
5. **Comparison** with a prior, when given: new / resolved / improved / worsened / unchanged per
   finding, from the draft's decisions against the prior report's entities and severity words;
   hedged either side ("possible persistent ...", "questioned on the prior, now present").
6. **Check**: the consistency checker (:mod:`retrieval.rag.consistency`) reads the draft back and
   deletes what contradicts (a normal statement beside a finding in a part of that anatomy, a
   comparison line against the findings, an impression item the findings do not state).

:class:`EditNearestGenerator` is the retrieve-and-edit drafter: it keeps one retrieved report's
wording (the nearest, or the consensus report: the candidate that agrees most, by ROUGE-L, with
the other retrieved reports), deletes its sentences that the retrieved consensus contradicts, adds
the best-supported sentences for findings the consensus states and it does not, then checks.
"""

from __future__ import annotations

import re

from retrieval.rag.consistency import ConsistencyChecker
from retrieval.rag.context import ContextBuilder, agreeing_cases
from retrieval.rag.types import (
    Change,
    ContextCase,
    ContextSentence,
    Draft,
    DraftContext,
    DraftImages,
    DraftSentence,
)
from retrieval.records import ABSENT, PRESENT, STATUS_VALUE, UNCERTAIN, Label, LabelKey, Status
from retrieval.taxonomy import default_taxonomy

ORDER = default_taxonomy().coarse_order  # the order FINDINGS and IMPRESSION follow
_SEVERITY = [(re.compile(r"\b(tiny|trace|minimal|small|mild|mildly|slight|slightly)\b"), 1),
             (re.compile(r"\b(moderate|moderately)\b"), 2),
             (re.compile(r"\b(large|severe|severely|marked|markedly|extensive|massive)\b"), 3)]


def severity(text: str) -> int:
    t = text.lower()
    for rx, level in reversed(_SEVERITY):
        if rx.search(t):
            return level
    return 0


class ExtractiveGenerator:
    name = "extractive"

    def __init__(self, present_at: float = 0.5, uncertain_at: float = 0.35, negative_support: float = 0.3,
                 check: bool = True) -> None:
        self.present_at = present_at
        self.uncertain_at = uncertain_at
        self.negative_support = negative_support
        self.check = check
        self.tax = default_taxonomy()
        self._checker: ConsistencyChecker | None = None

    @property
    def checker(self) -> ConsistencyChecker:
        if self._checker is None:
            self._checker = ConsistencyChecker(self.tax)
        return self._checker

    # ---- decisions ---------------------------------------------------------------------------
    def vote(self, ctx: DraftContext, key: LabelKey) -> tuple[float, float]:
        """(weighted share saying present, weighted share explicitly saying absent) for one key."""
        num = den = explicit_absent = 0.0
        for c in ctx.cases:
            w = max(c.score, 0.0) + 1e-3
            st = c.labels.get(key)
            den += w  # a silent case counts as absent
            if st is not None:
                num += w * STATUS_VALUE[st]
                explicit_absent += w if st == "absent" else 0.0
        return (num / den, explicit_absent / den) if den else (0.0, 0.0)

    def decide(self, ctx: DraftContext) -> dict[LabelKey, Status]:
        out: dict[LabelKey, Status] = {}
        for key in {k for c in ctx.cases for k in c.labels}:
            p, absent = self.vote(ctx, key)
            if p >= self.present_at:
                out[key] = "present"
            elif p >= self.uncertain_at:
                out[key] = "uncertain"
            elif absent >= self.negative_support:
                out[key] = "absent"
        # a finding decided in a part overrides a generic negative about the whole ("the lungs are
        # clear" vs a left lower lobe opacity): the specific positive is what the cases show
        for key in [k for k, st in out.items() if st == "absent"]:
            anat, finding = key
            if any(st != "absent" and k.finding == finding and k.anatomy in self.tax.anatomies
                   and anat in self.tax.anatomies and self.tax.is_within(k.anatomy, anat)
                   for k, st in out.items()):
                del out[key]
        return out

    # ---- generation --------------------------------------------------------------------------
    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        draft = Draft(generator=self.name, cases_used=[{"study_id": c.study_id, "score": round(c.score, 4)}
                                                      for c in ctx.cases])
        if not ctx.cases:
            return draft
        decided = self.decide(ctx)
        weight = {c.study_id: max(c.score, 0.0) + 1e-3 for c in ctx.cases}
        candidates = [s for c in ctx.cases for s in c.sentences]

        def consistent(s: ContextSentence) -> bool:
            return all(decided.get(lab.key) == lab.status and not self._conflicts(lab, decided)
                       for lab in s.labels)

        def supporters(s: ContextSentence) -> list[str]:
            return agreeing_cases(ctx.cases, s.labels) or [s.study_id]

        covered: set[LabelKey] = set()
        chosen: list[ContextSentence] = []
        for key in sorted(decided, key=lambda k: (_order(k), k)):
            if key in covered:
                continue
            pool = [s for s in candidates if s.labels and consistent(s) and key in {lab.key for lab in s.labels}]
            if not pool:
                continue
            best = max(pool, key=lambda s: (round(sum(weight[x] for x in supporters(s)), 6), weight[s.study_id], -len(s.text)))
            chosen.append(best)
            covered |= {lab.key for lab in best.labels}
        chosen.sort(key=lambda s: min(_order(lab.key) for lab in s.labels))
        draft.findings = [DraftSentence(s.text, tuple(supporters(s)), s.labels) for s in chosen]
        draft.impression = self._impression(ctx, decided, candidates, weight)
        if ctx.prior is not None:
            draft.interval_changes = self._compare(ctx, decided, chosen)
        return self.checker.repair(draft)[0] if self.check else draft

    def _conflicts(self, label: Label, decided: dict[LabelKey, Status]) -> bool:
        """A statement at one level against a decision at a parent or child level, e.g. "the lungs
        are clear" (lung|nodule|absent) beside a possible right lung nodule."""
        anat, finding, status = label.anatomy, label.finding, label.status
        for (a2, f2), st in decided.items():
            if f2 != finding or a2 == anat or st == status or "absent" not in (st, status):
                continue
            if a2 in self.tax.anatomies and anat in self.tax.anatomies and (
                    self.tax.is_within(a2, anat) or self.tax.is_within(anat, a2)):
                return True
        return False

    def _where(self, anat: str, finding: str, template: str) -> str:
        home = self.tax.findings[finding].anatomy if finding in self.tax.findings else None
        return "" if anat in ("chest", finding, home) else template.format(anat)

    def _impression(self, ctx: DraftContext, decided: dict[LabelKey, Status], candidates: list[ContextSentence],
                    weight: dict[str, float]) -> list[DraftSentence]:
        positives = [k for k, st in decided.items() if st in ("present", "uncertain")]
        if positives:
            out = []
            for key in sorted(positives, key=lambda k: (decided[k] != "present", _order(k), k)):
                anat, finding = key
                cites = tuple(c.study_id for c in ctx.cases if c.labels.get(key) in ("present", "uncertain"))
                hedge = "Possible " if decided[key] == "uncertain" else ""
                where = self._where(anat, finding, " ({})")
                out.append(DraftSentence(f"{hedge}{finding.capitalize() if not hedge else finding}{where}.",
                                         cites, (Label(anat, finding, decided[key]),)))
            return out
        normal_cases = [c.study_id for c in ctx.cases if not any(st == "present" for st in c.labels.values())]
        plain = [s for s in candidates if not s.labels and re.search(r"\b(no acute|normal|unremarkable|negative)\b", s.text.lower())]
        if plain:
            best = max(plain, key=lambda s: (weight.get(s.study_id, 0.0), -len(s.text)))
            return [DraftSentence(best.text, tuple(dict.fromkeys([best.study_id, *normal_cases])))]
        return [DraftSentence("No acute cardiopulmonary abnormality.", tuple(normal_cases))]

    def _compare(self, ctx: DraftContext, decided: dict[LabelKey, Status],
                 chosen: list[ContextSentence]) -> list[DraftSentence]:
        prior = ctx.prior
        assert prior is not None
        ref = f"prior:{prior.study_id}"
        prior_sev = _severities(ContextBuilder(taxonomy=self.tax).sentences(prior.study_id, prior.report))
        now_sev = _severities(chosen)
        out = []
        keys = sorted(set(decided) | {k for k, st in prior.labels.items() if st == "present"}, key=lambda k: (_order(k), k))
        for key in keys:
            anat, finding = key
            where = self._where(anat, finding, " in the {}")
            now, before = decided.get(key), prior.labels.get(key)
            if now is None and before == PRESENT and self.vote(ctx, key)[0] < self.uncertain_at:
                now = ABSENT  # the analog cases leave it out: propose resolution, for review
            agree: tuple[Status | None, ...] = (ABSENT, None) if now == ABSENT else (
                (PRESENT, UNCERTAIN) if now == UNCERTAIN else (now,))
            cites = tuple([ref] + [c.study_id for c in ctx.cases if c.labels.get(key) in agree])

            said: tuple[str, Change, Status] | None = None
            if now == PRESENT and before == UNCERTAIN:
                said = (f"The {finding}{where}, questioned on the prior study, is now present.", "new", PRESENT)
            elif now == PRESENT and before != PRESENT:
                said = (f"New {finding}{where} compared with the prior study.", "new", PRESENT)
            elif now == UNCERTAIN and before == PRESENT:
                said = (f"Possible persistent {finding}{where}; less definite than on the prior study.",
                        "unchanged", UNCERTAIN)
            elif now == ABSENT and before == PRESENT:
                said = (f"Interval resolution of the {finding}{where}.", "resolved", ABSENT)
            elif now == PRESENT and before == PRESENT:
                a, b = now_sev.get(key, 0), prior_sev.get(key, 0)
                change: Change = "unchanged" if a == b or 0 in (a, b) else ("worsened" if a > b else "improved")
                text = {"unchanged": f"The {finding}{where} is unchanged.",
                        "worsened": f"The {finding}{where} has worsened.",
                        "improved": f"The {finding}{where} has improved."}[change]
                said = (text, change, PRESENT)
            if said is not None:
                out.append(DraftSentence(said[0], cites, (Label(anat, finding, said[2]),), said[1]))
        return out


def copy_nearest(ctx: DraftContext) -> Draft:
    """Baseline: the nearest case's report, verbatim, each sentence citing that case."""
    draft = Draft(generator="copy-nearest")
    if ctx.cases:
        top = ctx.cases[0]
        draft.cases_used = [{"study_id": top.study_id, "score": round(top.score, 4)}]
        draft.findings = [DraftSentence(s.text, (top.study_id,), s.labels)
                          for s in _all_sentences(top)]
    return draft


def _all_sentences(case: ContextCase) -> list[ContextSentence]:
    return list(ContextBuilder().sentences(case.study_id, case.report))


def _severities(sentences: list[ContextSentence] | tuple[ContextSentence, ...]) -> dict[LabelKey, int]:
    """Per present finding, the strongest severity word in the sentences stating it."""
    out: dict[LabelKey, int] = {}
    for s in sentences:
        for lab in s.labels:
            if lab.status == PRESENT:
                out[lab.key] = max(out.get(lab.key, 0), severity(s.text))
    return out


def _order(key: LabelKey) -> int:
    return ORDER.index(key.anatomy) if key.anatomy in ORDER else len(ORDER)


class EditNearestGenerator(ExtractiveGenerator):
    """Retrieve-and-edit: one retrieved report's wording, corrected by the retrieved consensus.

    ``base``: ``"nearest"`` (the top case) or ``"consensus"`` (of the top ``candidates`` cases, the
    one with the highest score-weighted ROUGE-L against the others: the most typical wording).
    A base sentence is deleted when it states a label the consensus decides otherwise, or a
    finding (present or hedged) that fewer than ``keep_at`` of the retrieved weight supports.
    """

    def __init__(self, base: str = "nearest", candidates: int = 5, keep_at: float = 0.2, add: bool = True,
                 substitute: bool = True, add_negatives: bool = False, **kw: float | bool) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if base not in ("nearest", "consensus"):
            raise ValueError(f"base must be 'nearest' or 'consensus', not {base!r}")
        self.base, self.candidates, self.keep_at, self.add = base, candidates, keep_at, add
        self.substitute, self.add_negatives = substitute, add_negatives
        self.name = "edit-" + base

    def pick_base(self, ctx: DraftContext) -> ContextCase:
        if self.base == "nearest" or len(ctx.cases) < 3:
            return ctx.cases[0]
        pool = list(ctx.cases[: self.candidates])
        toks = [_words(c.report) for c in pool]
        w = [max(c.score, 0.0) + 1e-3 for c in pool]

        def agreement(i: int) -> float:
            return sum(w[j] * _rouge_l(toks[j], toks[i]) for j in range(len(pool)) if j != i)

        return pool[max(range(len(pool)), key=lambda i: (round(agreement(i), 6), -i))]

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        draft = Draft(generator=self.name, cases_used=[{"study_id": c.study_id, "score": round(c.score, 4)}
                                                      for c in ctx.cases])
        if not ctx.cases:
            return draft
        decided = self.decide(ctx)
        base = self.pick_base(ctx)
        weight = {c.study_id: max(c.score, 0.0) + 1e-3 for c in ctx.cases}

        def keep(s: ContextSentence) -> bool:
            for lab in s.labels:
                d = decided.get(lab.key)
                if d is not None and d != lab.status and not (d == PRESENT and lab.status == UNCERTAIN):
                    return False
                if lab.status != ABSENT and self.vote(ctx, lab.key)[0] < self.keep_at:
                    return False
                if self._conflicts(lab, decided):
                    return False
            return True

        candidates = [s for c in ctx.cases if c is not base for s in c.sentences]

        def best_for(key: LabelKey) -> ContextSentence | None:
            pool = [s for s in candidates if key in {lab.key for lab in s.labels}
                    and all(decided.get(lab.key) == lab.status and not self._conflicts(lab, decided)
                            for lab in s.labels)]
            if not pool:
                return None
            return max(pool, key=lambda s: (round(sum(weight[x] for x in agreeing_cases(ctx.cases, s.labels)), 6),
                                            weight[s.study_id], -len(s.text)))

        kept: list[ContextSentence] = []
        for s in _all_sentences(base):
            if keep(s):
                kept.append(s)
            elif self.substitute:  # the consensus's own sentence about what this one got wrong
                for lab in s.labels:
                    if decided.get(lab.key) not in (None, lab.status) and not any(
                            lab.key in {x.key for x in k.labels} for k in kept):
                        alt = best_for(lab.key)
                        if alt is not None and alt not in kept:
                            kept.append(alt)
        covered = {lab.key for s in kept for lab in s.labels}
        if self.add:
            for key in sorted(decided, key=lambda k: (_order(k), k)):
                if key in covered or (decided[key] == ABSENT and not self.add_negatives):
                    continue
                best = best_for(key)
                if best is None:
                    continue
                at = next((i for i, s in enumerate(kept) if s.labels and min(_order(lab.key) for lab in s.labels)
                           > _order(key)), None)
                if at is None:  # before the closing unlabelled sentences ("No acute disease.")
                    at = len(kept)
                    while at > 0 and not kept[at - 1].labels:
                        at -= 1
                kept.insert(at, best)
                covered |= {lab.key for lab in best.labels}
        draft.findings = [DraftSentence(s.text, tuple(agreeing_cases(ctx.cases, s.labels) or [s.study_id]), s.labels)
                          for s in kept]
        if ctx.prior is not None:
            draft.interval_changes = self._compare(ctx, decided, kept)
        return self.checker.repair(draft)[0] if self.check else draft


_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return [t for t in _WORD.findall(text.lower()) if t != "xxxx"]


def _rouge_l(ref: list[str], hyp: list[str]) -> float:
    """ROUGE-L F (beta 1.2), as in pycocoevalcap; for choosing the consensus wording."""
    if not ref or not hyp:
        return 0.0
    prev = [0] * (len(hyp) + 1)
    for a in ref:
        cur = [0]
        for j, b in enumerate(hyp):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if not lcs:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return (1 + 1.44) * p * r / (r + 1.44 * p)
