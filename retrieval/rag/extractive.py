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
   Resolution of a prior finding is proposed only when analog cases holding at least
   ``resolve_at`` (0.5) of the retrieved weight state it absent; when they are silent about it
   (or too few say it is gone), the line says it was not assessed ("Possible persistent X: not
   assessed by the analog cases ...; compare directly with the prior study.", no change claimed).
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
from retrieval.rag.context import ContextBuilder, agreeing_cases, copy_report
from retrieval.rag.mbr import POOL, SCORE_WEIGHT, SIMILARITIES, SIMILARITY, mbr_base
from retrieval.rag.overlap import rouge_l
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
                 check: bool = True, resolve_at: float = 0.5) -> None:
        self.present_at = present_at
        self.uncertain_at = uncertain_at
        self.negative_support = negative_support
        self.resolve_at = resolve_at  # "interval resolution" needs this share of cases saying it is absent
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

    def stated_absent(self, ctx: DraftContext, key: LabelKey) -> float:
        """Weighted share of the cases that explicitly state ``key`` absent, for its anatomy or a
        containing one ("The lungs are clear." rules out a right lung opacity), and do not also
        state it present or hedged. Silence is not counted: it is not evidence of resolution."""
        den = sum(max(c.score, 0.0) + 1e-3 for c in ctx.cases)
        ids = set(self.stating_absent(ctx, key))
        num = sum(max(c.score, 0.0) + 1e-3 for c in ctx.cases if c.study_id in ids)
        return num / den if den else 0.0

    def stating_absent(self, ctx: DraftContext, key: LabelKey) -> list[str]:
        """Ids of the cases :meth:`stated_absent` counts."""
        anat, finding = key
        return [c.study_id for c in ctx.cases if c.labels.get(key) not in (PRESENT, UNCERTAIN) and any(
            st == ABSENT and k.finding == finding and (k.anatomy == anat or self._within(anat, k.anatomy))
            for k, st in c.labels.items())]

    def _within(self, part: str, whole: str) -> bool:
        return part in self.tax.anatomies and whole in self.tax.anatomies and self.tax.is_within(part, whole)

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
        draft = Draft.for_context(ctx, self.name)
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
            if before == PRESENT and now in (None, ABSENT) and self.stated_absent(ctx, key) < self.resolve_at:
                # the analog cases are silent (or too few say it is gone): no resolution claimed
                why = "too few of which state it absent" if self.stated_absent(ctx, key) else "which do not mention it"
                out.append(DraftSentence(
                    f"Possible persistent {finding}{where}: not assessed by the analog cases, {why}; compare "
                    f"directly with the prior study.", (ref,), (Label(anat, finding, UNCERTAIN),)))
                continue
            if before == PRESENT and now is None and not any(
                    st != ABSENT and k.finding == finding and (self._within(k.anatomy, anat) or self._within(anat, k.anatomy))
                    for k, st in decided.items()):
                now = ABSENT  # stated absent (here or for a containing anatomy) by enough of the cases
            agree: tuple[Status | None, ...] = (ABSENT, None) if now == ABSENT else (
                (PRESENT, UNCERTAIN) if now == UNCERTAIN else (now,))
            cites = tuple([ref] + (self.stating_absent(ctx, key) if now == ABSENT else
                                   [c.study_id for c in ctx.cases if c.labels.get(key) in agree]))

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
    return copy_report(ctx.cases[0], "copy-nearest") if ctx.cases else Draft(generator="copy-nearest")


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
            return sum(w[j] * rouge_l(toks[j], toks[i]) for j in range(len(pool)) if j != i)

        return pool[max(range(len(pool)), key=lambda i: (round(agreement(i), 6), -i))]

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        draft = Draft.for_context(ctx, self.name)
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


_POS: tuple[Status, ...] = (PRESENT, UNCERTAIN)


class ConsensusEditGenerator(ExtractiveGenerator):
    """Conservative retrieve-and-edit: the nearest report's wording, edited only where the other
    retrieved cases disagree strongly, at the same length.

    1. **Delete** a nearest-report sentence stating a present or hedged finding that less than
       ``delete_below`` of the *other* cases' retrieval weight states (unless another case states
       that finding in some anatomy: then the side or lobe is what differs, and the wording is
       kept), or a negative that at least ``flip_at`` of them state present.
    2. **Substitute** each deleted sentence with the other cases' sentence most like it (ROUGE-L)
       among those the consensus allows (positives stated by >= half the others' weight, negatives
       no other case contradicts), so the report keeps its shape; a flipped negative gets the
       best-supported positive sentence.
    3. **Length control**: while the draft is shorter than ``fill_ratio`` x the longer of the
       nearest report and the score-weighted mean length of the retrieved reports, add the other
       cases' sentences that the retrieved reports agree on (weighted best-sentence ROUGE-L >=
       ``fill_at``) and the draft does not already say (ROUGE-L < 0.5 with each of its sentences).
    4. Every added sentence goes at its relative position in its source report; then the checker.

    ``base="mbr"`` ("mbr+len") edits the report chosen by minimum Bayes risk instead of the nearest
    (:func:`retrieval.rag.mbr.mbr_base`: of the top ``mbr_pool`` cases, the one most similar, by
    ``mbr_similarity``, to the other retrieved reports, plus ``mbr_score_weight`` x its retrieval
    score); "the other cases" are then the cases other than that base.

    Settings chosen on IU X-ray train (leave-one-out, twins removed, 1,200 queries); see
    docs/drafting.md.
    """

    def __init__(self, delete_below: float = 0.2, flip_at: float = 0.5, keep_family: bool = True,
                 substitute: bool = True, fill_at: float = 0.6, fill_ratio: float = 0.9, redundant_at: float = 0.5,
                 base: str = "nearest", mbr_pool: int = POOL, mbr_similarity: str = SIMILARITY,
                 mbr_score_weight: float = SCORE_WEIGHT, **kw: float | bool) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        if base not in ("nearest", "mbr"):
            raise ValueError(f"base must be 'nearest' or 'mbr', not {base!r}")
        if mbr_similarity not in SIMILARITIES:
            raise ValueError(f"mbr_similarity must be one of {', '.join(SIMILARITIES)}, not {mbr_similarity!r}")
        self.delete_below, self.flip_at, self.keep_family = delete_below, flip_at, keep_family
        self.substitute, self.fill_at, self.fill_ratio, self.redundant_at = substitute, fill_at, fill_ratio, redundant_at
        self.base, self.mbr_pool, self.mbr_similarity, self.mbr_score_weight = (
            base, mbr_pool, mbr_similarity, mbr_score_weight)
        self.name = "edit-nearest+len" if base == "nearest" else "mbr+len"

    def pick_base(self, ctx: DraftContext) -> ContextCase:
        """The report whose wording is kept: the nearest, or the MBR choice."""
        if self.base == "nearest":
            return ctx.cases[0]
        return mbr_base(ctx.cases, self.mbr_pool, self.mbr_similarity, self.mbr_score_weight)

    @staticmethod
    def share(ctx: DraftContext, base: ContextCase, key: LabelKey, states: tuple[Status, ...]) -> float:
        """Weighted share of the cases other than ``base`` that state ``key`` as one of ``states``."""
        num = den = 0.0
        for c in ctx.cases:
            if c is base:
                continue
            w = max(c.score, 0.0) + 1e-3
            den += w
            num += w * (c.labels.get(key) in states)
        return num / den if den else 0.0

    def _allowed(self, ctx: DraftContext, base: ContextCase, s: ContextSentence) -> bool:
        for lab in s.labels:
            p = self.share(ctx, base, lab.key, _POS)
            if lab.status in _POS and p < 0.5:
                return False
            if lab.status == ABSENT and (p >= self.delete_below or base.labels.get(lab.key) in _POS):
                return False
        return True

    @staticmethod
    def _agreement(ctx: DraftContext, base: ContextCase, s: ContextSentence) -> float:
        """Weighted best-sentence ROUGE-L of ``s`` against the other cases' reports."""
        ws = _words(s.text)
        num = den = 0.0
        for c in ctx.cases:
            if c is base:
                continue
            w = max(c.score, 0.0) + 1e-3
            den += w
            num += w * max((rouge_l(_words(y.text), ws) for y in c.sentences), default=0.0)
        return num / den if den else 0.0

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        draft = Draft.for_context(ctx, self.name)
        if not ctx.cases:
            return draft
        base = self.pick_base(ctx)
        others = [c for c in ctx.cases if c is not base]
        weight = {c.study_id: max(c.score, 0.0) + 1e-3 for c in ctx.cases}
        base_sents = _all_sentences(base)
        n = len(base_sents)
        items: list[tuple[float, ContextSentence]] = []  # (relative position, sentence)
        deleted: set[LabelKey] = set()

        def positioned(c: ContextCase, s: ContextSentence) -> tuple[float, ContextSentence]:
            texts = [x.text for x in _all_sentences(c)]
            j = texts.index(s.text) if s.text in texts else len(texts) // 2
            return (j + 0.5) / max(1, len(texts)), s

        def family(finding: str) -> bool:
            return any(k.finding == finding and st in _POS for c in others for k, st in c.labels.items())

        def substitute_for(s: ContextSentence) -> ContextSentence | None:
            have = {x.text.lower() for _, x in items}
            ws = _words(s.text)
            pool = [x for c in others for x in c.sentences
                    if x.text.lower() not in have and self._allowed(ctx, base, x)]
            return max(pool, key=lambda x: rouge_l(ws, _words(x.text)), default=None)

        for i, s in enumerate(base_sents):
            drop = any((lab.status in _POS and self.share(ctx, base, lab.key, _POS) < self.delete_below
                        and not (self.keep_family and family(lab.finding)))
                       or (lab.status == ABSENT and self.share(ctx, base, lab.key, _POS) >= self.flip_at)
                       for lab in s.labels)
            if not drop:
                items.append(((i + 0.5) / n, s))
                continue
            deleted |= {lab.key for lab in s.labels}
            alt = substitute_for(s) if self.substitute else None
            if alt is not None:
                items.append(((i + 0.5) / n, alt))
        covered = {lab.key for _, s in items for lab in s.labels}

        def support(s: ContextSentence) -> float:
            return sum(weight[x] for x in agreeing_cases(ctx.cases, s.labels))

        # a negative the others contradict: their best-supported positive sentence instead
        for key in sorted(k for k in deleted - covered if base.labels.get(k) == ABSENT
                          and self.share(ctx, base, k, _POS) >= self.flip_at):
            pool = [positioned(c, s) for c in others for s in c.sentences
                    if any(lab.key == key and lab.status in _POS for lab in s.labels)
                    and all(lab.key == key or lab.key not in covered or base.labels.get(lab.key) == lab.status
                            for lab in s.labels)]
            if pool:
                best = max(pool, key=lambda p: (round(support(p[1]), 6), weight[p[1].study_id], -len(p[1].text)))
                items.append(best)
                covered |= {lab.key for lab in best[1].labels}

        # length control
        mean = sum(weight[c.study_id] * len(_words(c.report)) for c in ctx.cases) / sum(weight.values())
        target = self.fill_ratio * max(mean, len(_words(base.report)))
        cands = sorted(((self._agreement(ctx, base, s), c, s) for c in others for s in c.sentences
                        if self._allowed(ctx, base, s)), key=lambda t: -t[0])
        length = sum(len(_words(s.text)) for _, s in items)
        for score, c, s in cands:
            if length >= target or score < self.fill_at:
                break
            if any(rouge_l(_words(x.text), _words(s.text)) >= self.redundant_at for _, x in items):
                continue
            if any(lab.key in covered and base.labels.get(lab.key, lab.status) != lab.status for lab in s.labels):
                continue
            items.append(positioned(c, s))
            covered |= {lab.key for lab in s.labels}
            length += len(_words(s.text))

        items.sort(key=lambda p: p[0])
        draft.findings = [DraftSentence(s.text, tuple(agreeing_cases(ctx.cases, s.labels) or [s.study_id]), s.labels)
                          for _, s in items]
        if ctx.prior is not None:
            draft.interval_changes = self._compare(ctx, self.decide(ctx), [s for _, s in items])
        return self.checker.repair(draft)[0] if self.check else draft
