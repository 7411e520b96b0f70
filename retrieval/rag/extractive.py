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
"""

from __future__ import annotations

import re

from retrieval.rag.context import ContextBuilder, agreeing_cases
from retrieval.rag.types import ContextSentence, Draft, DraftContext, DraftSentence
from retrieval.taxonomy import default_taxonomy

ORDER = ("lung", "right lung", "left lung", "pleura", "right pleura", "left pleura", "heart",
         "mediastinum", "diaphragm", "bones", "upper abdomen", "soft tissues", "chest")
VALUE = {"present": 1.0, "uncertain": 0.5, "absent": 0.0}
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

    def __init__(self, present_at: float = 0.5, uncertain_at: float = 0.35, negative_support: float = 0.3) -> None:
        self.present_at = present_at
        self.uncertain_at = uncertain_at
        self.negative_support = negative_support
        self.tax = default_taxonomy()

    # ---- decisions ---------------------------------------------------------------------------
    def vote(self, ctx: DraftContext, key: str) -> tuple[float, float]:
        """(weighted share saying present, weighted share explicitly saying absent) for one key."""
        num = den = explicit_absent = 0.0
        for c in ctx.cases:
            w = max(c.score, 0.0) + 1e-3
            st = c.labels.get(key)
            den += w  # a silent case counts as absent
            if st is not None:
                num += w * VALUE[st]
                explicit_absent += w if st == "absent" else 0.0
        return (num / den, explicit_absent / den) if den else (0.0, 0.0)

    def decide(self, ctx: DraftContext) -> dict[str, str]:
        out: dict[str, str] = {}
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
            anat, finding = key.split("|")
            if any(st != "absent" and k.split("|")[1] == finding and k.split("|")[0] in self.tax.anatomies
                   and anat in self.tax.anatomies and self.tax.is_within(k.split("|")[0], anat)
                   for k, st in out.items()):
                del out[key]
        return out

    # ---- generation --------------------------------------------------------------------------
    def generate(self, ctx: DraftContext, images=None) -> Draft:
        draft = Draft(generator=self.name, cases_used=[{"study_id": c.study_id, "score": round(c.score, 4)}
                                                      for c in ctx.cases])
        if not ctx.cases:
            return draft
        decided = self.decide(ctx)
        weight = {c.study_id: max(c.score, 0.0) + 1e-3 for c in ctx.cases}
        candidates = [s for c in ctx.cases for s in c.sentences]

        def consistent(s: ContextSentence) -> bool:
            return all(decided.get(_key(lab)) == _status(lab) and not self._conflicts(lab, decided)
                       for lab in s.labels)

        def supporters(s: ContextSentence) -> list[str]:
            return agreeing_cases(ctx.cases, s.labels) or [s.study_id]

        covered: set[str] = set()
        chosen: list[ContextSentence] = []
        for key in sorted(decided, key=lambda k: (_order(k), k)):
            if key in covered:
                continue
            pool = [s for s in candidates if s.labels and consistent(s) and key in {_key(lab) for lab in s.labels}]
            if not pool:
                continue
            best = max(pool, key=lambda s: (round(sum(weight[x] for x in supporters(s)), 6), weight[s.study_id], -len(s.text)))
            chosen.append(best)
            covered |= {_key(lab) for lab in best.labels}
        chosen.sort(key=lambda s: min(_order(_key(lab)) for lab in s.labels))
        draft.findings = [DraftSentence(s.text, tuple(supporters(s)), s.labels) for s in chosen]
        draft.impression = self._impression(ctx, decided, candidates, weight)
        if ctx.prior is not None:
            draft.interval_changes = self._compare(ctx, decided, chosen)
        return draft

    def _conflicts(self, label: str, decided: dict[str, str]) -> bool:
        """A statement at one level against a decision at a parent or child level, e.g. "the lungs
        are clear" (lung|nodule|absent) beside a possible right lung nodule."""
        anat, finding, status = label.split("|")
        for key, st in decided.items():
            a2, f2 = key.split("|")
            if f2 != finding or a2 == anat or st == status or "absent" not in (st, status):
                continue
            if a2 in self.tax.anatomies and anat in self.tax.anatomies and (
                    self.tax.is_within(a2, anat) or self.tax.is_within(anat, a2)):
                return True
        return False

    def _where(self, anat: str, finding: str, template: str) -> str:
        home = self.tax.findings[finding].anatomy if finding in self.tax.findings else None
        return "" if anat in ("chest", finding, home) else template.format(anat)

    def _impression(self, ctx: DraftContext, decided: dict[str, str], candidates, weight) -> list[DraftSentence]:
        positives = [k for k, st in decided.items() if st in ("present", "uncertain")]
        if positives:
            out = []
            for key in sorted(positives, key=lambda k: (decided[k] != "present", _order(k), k)):
                anat, finding = key.split("|")
                cites = tuple(c.study_id for c in ctx.cases if c.labels.get(key) in ("present", "uncertain"))
                hedge = "Possible " if decided[key] == "uncertain" else ""
                where = self._where(anat, finding, " ({})")
                out.append(DraftSentence(f"{hedge}{finding.capitalize() if not hedge else finding}{where}.",
                                         cites, (f"{key}|{decided[key]}",)))
            return out
        normal_cases = [c.study_id for c in ctx.cases if not any(st == "present" for st in c.labels.values())]
        plain = [s for s in candidates if not s.labels and re.search(r"\b(no acute|normal|unremarkable|negative)\b", s.text.lower())]
        if plain:
            best = max(plain, key=lambda s: (weight.get(s.study_id, 0.0), -len(s.text)))
            return [DraftSentence(best.text, tuple(dict.fromkeys([best.study_id, *normal_cases])))]
        return [DraftSentence("No acute cardiopulmonary abnormality.", tuple(normal_cases))]

    def _compare(self, ctx: DraftContext, decided: dict[str, str], chosen: list[ContextSentence]) -> list[DraftSentence]:
        prior = ctx.prior
        assert prior is not None
        ref = f"prior:{prior.study_id}"
        prior_sev: dict[str, int] = {}
        for s in ContextBuilder(taxonomy=self.tax).sentences(prior.study_id, prior.report):
            for lab in s.labels:
                if _status(lab) == "present":
                    prior_sev[_key(lab)] = max(prior_sev.get(_key(lab), 0), severity(s.text))
        now_sev: dict[str, int] = {}
        for s in chosen:
            for lab in s.labels:
                if _status(lab) == "present":
                    now_sev[_key(lab)] = max(now_sev.get(_key(lab), 0), severity(s.text))
        out = []
        keys = sorted(set(decided) | {k for k, st in prior.labels.items() if st == "present"}, key=lambda k: (_order(k), k))
        for key in keys:
            anat, finding = key.split("|")
            where = self._where(anat, finding, " in the {}")
            now, before = decided.get(key), prior.labels.get(key)
            if now is None and before == "present" and self.vote(ctx, key)[0] < self.uncertain_at:
                now = "absent"  # the analog cases leave it out: propose resolution, for review
            agree = {"absent": ("absent", None), "uncertain": ("present", "uncertain")}.get(now or "", (now,))
            cites = tuple([ref] + [c.study_id for c in ctx.cases if c.labels.get(key) in agree])
            if now == "present" and before == "uncertain":
                out.append(DraftSentence(f"The {finding}{where}, questioned on the prior study, is now present.",
                                         cites, (f"{key}|new",)))
            elif now == "present" and before != "present":
                out.append(DraftSentence(f"New {finding}{where} compared with the prior study.", cites, (f"{key}|new",)))
            elif now == "uncertain" and before == "present":
                out.append(DraftSentence(f"Possible persistent {finding}{where}; less definite than on the prior study.",
                                         cites, (f"{key}|unchanged",)))
            elif now == "absent" and before == "present":
                out.append(DraftSentence(f"Interval resolution of the {finding}{where}.", cites, (f"{key}|resolved",)))
            elif now == "present" and before == "present":
                a, b = now_sev.get(key, 0), prior_sev.get(key, 0)
                change = "unchanged" if a == b or 0 in (a, b) else ("worsened" if a > b else "improved")
                text = {"unchanged": f"The {finding}{where} is unchanged.",
                        "worsened": f"The {finding}{where} has worsened.",
                        "improved": f"The {finding}{where} has improved."}[change]
                out.append(DraftSentence(text, cites, (f"{key}|{change}",)))
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


def _all_sentences(case) -> list[ContextSentence]:
    return list(ContextBuilder().sentences(case.study_id, case.report))


def _key(label: str) -> str:
    return label.rsplit("|", 1)[0]


def _status(label: str) -> str:
    return label.rsplit("|", 1)[1]


def _order(key: str) -> int:
    anat = key.split("|")[0]
    return ORDER.index(anat) if anat in ORDER else len(ORDER)
