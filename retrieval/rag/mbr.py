"""Minimum-Bayes-risk (MBR) choice of the base report among the retrieved cases.

Why: the retrieve-and-edit drafters keep one retrieved report's wording, and copying the top
report ("copy-nearest") bets everything on the single nearest case. MBR selection (the usual
n-gram-metric lever in retrieval-based report generation) treats the retrieved reports as samples
of what the held-out report says and keeps the one with the highest expected similarity to them:
the score-weighted mean similarity to the *other* retrieved reports, plus ``score_weight`` x its own
retrieval score (0: pure consensus; large: the nearest report). Similarities are cheap, plain-Python
token measures (ROUGE-L, smoothed sentence BLEU-2, bag-of-words F1) on lower-cased alphanumeric
tokens without "XXXX", the tokens the evaluation scores.

:class:`CopyMBRGenerator` copies the chosen report verbatim ("copy-mbr"); the edited version is
:class:`~retrieval.rag.extractive.ConsensusEditGenerator` with ``base="mbr"`` ("mbr+len").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

from retrieval.rag.context import ContextBuilder, copy_report
from retrieval.rag.overlap import rouge_l
from retrieval.rag.types import ContextCase, Draft, DraftContext, DraftImages

# The setting chosen on IU X-ray train (leave-one-out, twins removed, 1,200 queries; docs/drafting.md):
# the top 5 (the protocol's k), bag-of-words F1, and 15 x the retrieval score. Pure MBR
# (score_weight 0) loses 0.03 BLEU-4 there: with these MiniLM cosine scores a weight of 15 moves the
# base off the nearest report in about 10% of the drafts. The weight is on the retriever's score
# scale: another retriever's scores need it chosen again.
POOL, SIMILARITY, SCORE_WEIGHT = 5, "f1", 15.0

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return [t for t in _WORD.findall(text.lower()) if t != "xxxx"]


def bleu2(ref: list[str], hyp: list[str]) -> float:
    """Sentence BLEU-2 of ``hyp`` against ``ref``: add-one smoothed bigram precision, brevity penalty."""
    if not ref or not hyp:
        return 0.0
    p = []
    for n in (1, 2):
        hc = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        rc = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
        match = sum(min(c, rc[g]) for g, c in hc.items())
        total = max(0, len(hyp) - n + 1)
        p.append((match + (n > 1)) / (total + (n > 1)) if total + (n > 1) else 0.0)
    if p[0] == 0.0:
        return 0.0
    bp = 1.0 if len(hyp) >= len(ref) else math.exp(1 - len(ref) / len(hyp))
    return bp * math.sqrt(p[0] * p[1])


def token_f1(ref: list[str], hyp: list[str]) -> float:
    """Bag-of-words F1 (clipped unigram overlap)."""
    common = sum((Counter(ref) & Counter(hyp)).values())
    return 2 * common / (len(ref) + len(hyp)) if common else 0.0


SIMILARITIES: dict[str, Callable[[list[str], list[str]], float]] = {
    "rougeL": rouge_l, "bleu2": bleu2, "f1": token_f1}


def mbr_utilities(cases: Sequence[ContextCase], similarity: str = SIMILARITY, score_weight: float = SCORE_WEIGHT) -> list[float]:
    """Per case: the retrieval-weighted mean similarity of its report (as hypothesis) to the other
    cases' reports (as references), plus ``score_weight`` x its retrieval score."""
    sim = SIMILARITIES[similarity]
    toks = [words(c.report) for c in cases]
    w = [max(c.score, 0.0) + 1e-3 for c in cases]
    out = []
    for i, c in enumerate(cases):
        den = sum(w[j] for j in range(len(cases)) if j != i)
        agree = sum(w[j] * sim(toks[j], toks[i]) for j in range(len(cases)) if j != i) / den if den else 0.0
        out.append(agree + score_weight * c.score)
    return out


def mbr_base(cases: Sequence[ContextCase], pool: int = POOL, similarity: str = SIMILARITY,
             score_weight: float = SCORE_WEIGHT) -> ContextCase:
    """The case of the top ``pool`` with the highest :func:`mbr_utilities` (ties: the higher rank)."""
    top = list(cases[:pool])
    if len(top) < 3:  # with two reports "agreement" is symmetric: keep the nearest
        return cases[0]
    u = mbr_utilities(top, similarity, score_weight)
    return top[max(range(len(top)), key=lambda i: (round(u[i], 9), -i))]


class CopyMBRGenerator:
    """``copy-mbr``: the MBR-chosen retrieved report verbatim, each sentence citing that case
    (the MBR counterpart of :func:`~retrieval.rag.extractive.copy_nearest`; no editing, no checker)."""

    name = "copy-mbr"

    def __init__(self, pool: int = POOL, similarity: str = SIMILARITY, score_weight: float = SCORE_WEIGHT) -> None:
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, not {similarity!r}")
        self.pool, self.similarity, self.score_weight = pool, similarity, score_weight
        self._builder: ContextBuilder | None = None

    def generate(self, ctx: DraftContext, images: DraftImages | None = None) -> Draft:
        if self._builder is None:
            self._builder = ContextBuilder()
        if not ctx.cases:
            return Draft(generator=self.name)
        return copy_report(mbr_base(ctx.cases, self.pool, self.similarity, self.score_weight), self.name,
                           self._builder)
