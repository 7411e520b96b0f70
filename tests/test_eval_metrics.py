"""Retrieval-evaluation numbers checked against scikit-learn's reference implementations."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from eval.retrieval import EvalConfig, rank_metrics, tfidf_baseline


def _graded_case(seed: int, n: int = 40, nq: int = 12):
    rng = np.random.default_rng(seed)
    queries = np.sort(rng.choice(n, nq, replace=False))
    # graded gains like s / s_a: many zeros, partial agreements, some full ones
    sim = rng.choice([0.0, 0.0, 0.25, 1 / 3, 0.5, 0.75, 1.0], size=(nq, n))
    sim[:, :2] = 0.6  # every query has a positive gain somewhere (see the convention test below)
    sim[np.arange(nq), queries] = 1.0  # a study agrees with itself; must not count
    scores = rng.standard_normal((nq, n))  # continuous: no tied scores
    return sim, scores, queries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ndcg_matches_sklearn(seed):
    sim, scores, queries = _graded_case(seed)
    n = sim.shape[1]
    cfg = EvalConfig(ks=(1, 5), ndcg_ks=(1, 5, 10, n + 10))  # the last k exceeds the candidates
    ours, _, _ = rank_metrics(sim, scores, queries, cfg)
    # Like with like:
    # * rank_metrics excludes the query's own column (its gain and its score); sklearn has no
    #   such notion, so each row is given to it without that column (n - 1 candidates).
    # * both take the gain as the graded relevance itself (not 2**rel - 1), the discount as
    #   1 / log2(rank + 1), and the ideal DCG over *all* candidates' gains cut at k (not over
    #   the retrieved top k), so no further adjustment is needed.
    # * sklearn (ignore_ties=False) averages gains over tied scores, rank_metrics breaks ties
    #   by column order; the scores here are continuous, so there are no ties.
    # * a query whose gains are all zero scores 1.0 here and 0.0 in sklearn; every query here
    #   has a positive gain (columns 0 and 1), the difference is pinned by the next test.
    keep = np.ones_like(sim, dtype=bool)
    keep[np.arange(len(queries)), queries] = False
    y_true = sim[keep].reshape(len(queries), n - 1)
    y_score = scores[keep].reshape(len(queries), n - 1)
    for k in cfg.ndcg_ks:
        ref = ndcg_score(y_true, y_score, k=k)
        assert ours.ndcg[f"@{k}"] == pytest.approx(ref, abs=1e-6), k


def test_ndcg_of_a_query_without_any_relevant_study():
    """Convention, not an accident: no positive gain anywhere -> NDCG 1.0 (sklearn says 0.0).

    Every ranking is ideal when nothing is relevant; sklearn scores such a query 0. The rows of
    ``rank_metrics`` average over all queries, so this choice moves the mean; compare runs under
    one convention only.
    """
    sim = np.zeros((1, 6))
    scores = np.arange(6, dtype=float)[None]
    ours, dropped, _ = rank_metrics(sim, scores, np.array([2]), EvalConfig(ks=(1,), ndcg_ks=(3,)))
    assert ours.ndcg["@3"] == 1.0 and dropped == 1
    assert ndcg_score(np.delete(sim, 2, axis=1), np.delete(scores, 2, axis=1), k=3) == 0.0


def test_tfidf_baseline_is_the_documented_weighting():
    reports = ["Heart size normal. XXXX lungs clear.", "Lungs clear, lungs clear.", None, "XXXX",
               "Small left pleural effusion. Heart normal."]
    emb = tfidf_baseline(reports)(None)
    assert emb.dtype == np.float32 and emb.shape[0] == len(reports)
    assert not emb[2].any() and not emb[3].any()  # no text / only the anonymisation token
    np.testing.assert_allclose(np.linalg.norm(emb[[0, 1, 4]], axis=1), 1.0, atol=1e-6)
    # reference: the formula by hand (sublinear tf, smoothed idf, L2), all terms kept
    docs = [["heart", "size", "normal", "lungs", "clear"], ["lungs", "clear", "lungs", "clear"], [], [],
            ["small", "left", "pleural", "effusion", "heart", "normal"]]
    grams = [d + [f"{a} {b}" for a, b in zip(d, d[1:], strict=False)] for d in docs]  # xxxx gone before bigrams
    vocab = sorted({g for d in grams for g in d})
    assert emb.shape[1] == len(vocab)
    dfs = np.array([sum(g in d for d in grams) for g in vocab])
    idf = np.log((1 + len(docs)) / (1 + dfs)) + 1
    ref = np.array([[(1 + np.log(d.count(g))) * idf[j] if g in d else 0.0 for j, g in enumerate(vocab)]
                    for d in grams])
    norms = np.linalg.norm(ref, axis=1, keepdims=True)
    ref = ref / np.where(norms > 0, norms, 1)
    np.testing.assert_allclose(emb @ emb.T, ref @ ref.T, atol=1e-6)
    # a capped vocabulary keeps the terms found in the most documents, not the most frequent:
    # "effusion" (3 documents) wins over "clear" (4 times, in one)
    few = tfidf_baseline(["effusion clear clear clear clear", "effusion heart", "effusion lungs"], max_terms=1)(None)
    np.testing.assert_allclose(few, np.ones((3, 1)), atol=1e-6)
    assert tfidf_baseline([None, ""])(None).shape == (2, 0)
