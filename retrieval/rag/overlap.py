"""Word overlap between report texts: ROUGE-L (LCS F-measure, beta 1.2, as pycocoevalcap).

One implementation for two users: the edit drafter picks the wording that best agrees with the
retrieved reports, and ``medrag eval draft`` scores drafts with the same measure.
"""

from __future__ import annotations


def rouge_l(ref: list[str], hyp: list[str]) -> float:
    """ROUGE-L F of token lists ``hyp`` against ``ref`` (0 when either is empty)."""
    if not ref or not hyp:
        return 0.0
    prev = [0] * (len(hyp) + 1)
    for a in ref:
        cur = [0]
        for j, b in enumerate(hyp):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    beta2 = 1.2 ** 2
    return (1 + beta2) * p * r / (r + beta2 * p)
