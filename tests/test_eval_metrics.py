"""Evaluation numbers checked against reference implementations (scikit-learn, pycocoevalcap) and
against constructed cases with a known answer (the paired bootstrap)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from eval.drafting import (
    ReportStats,
    bleu_counts,
    coco_bleu4,
    coco_scores,
    micro_f1,
    paired_intervals,
)
from eval.retrieval import EvalConfig, rank_metrics, tfidf_baseline
from eval.stats import bootstrap_indices, paired_bootstrap, paired_bootstrap_totals


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


# ---- paired bootstrap (eval.stats) and the drafting intervals built on it ------------------------
def test_paired_bootstrap_of_identical_methods_is_degenerate_at_zero():
    rng = np.random.default_rng(0)
    x = rng.random(50)
    assert paired_bootstrap(x, x.copy(), 500, 0) == (0.0, 0.0, 0.0)
    counts = rng.integers(0, 5, size=(50, 3)).astype(float)
    assert paired_bootstrap_totals(counts, counts.copy(), micro_f1, 500, 0) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_of_a_method_better_on_every_item_excludes_zero():
    rng = np.random.default_rng(1)
    b = rng.random(40)
    gain = 0.01 + 0.02 * rng.random(40)  # better on every item, by 0.01-0.03
    mean, lo, hi = paired_bootstrap(b + gain, b, 2000, 0)
    assert mean == pytest.approx(gain.mean()) and 0.01 <= lo < mean < hi <= 0.03
    # corpus-level: one more true positive and one fewer false negative on every item
    base = np.column_stack([rng.integers(1, 4, 40), rng.integers(0, 3, 40), rng.integers(1, 4, 40)]).astype(float)
    better = base + [1, 0, -1]
    point, lo, hi = paired_bootstrap_totals(better, base, micro_f1, 2000, 0)
    assert point == pytest.approx(float(micro_f1(better.sum(0)) - micro_f1(base.sum(0))))
    assert 0 < lo <= point <= hi


def test_totals_bootstrap_draws_the_same_resamples_as_the_mean_bootstrap():
    rng = np.random.default_rng(2)
    a, b = rng.random(30), rng.random(30)
    with_count = np.column_stack([a, np.ones(30)]), np.column_stack([b, np.ones(30)])
    mean_of = lambda t: t[..., 0] / t[..., 1]  # noqa: E731
    assert paired_bootstrap_totals(*with_count, mean_of, 400, 7) == pytest.approx(paired_bootstrap(a, b, 400, 7))
    idx = bootstrap_indices(30, 400, 7)
    assert idx.shape == (400, 30) and (bootstrap_indices(30, 400, 7) == idx).all()
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap_totals(np.ones((3, 2)), np.ones((4, 2)), mean_of, 10, 0)


_REFS = ["no pleural effusion heart size normal", "small left pleural effusion", "the lungs are clear",
         "heart is enlarged no focal consolidation", "calcified granuloma in the right upper lobe lungs clear",
         "no acute cardiopulmonary abnormality", "mild cardiomegaly no effusion", "no pneumothorax"]


def test_corpus_bleu4_from_per_report_counts_is_pycocoevalcaps():
    hyps = ["no pleural effusion heart normal", "", "lungs are clear", "heart size is normal",
            "granuloma right upper lobe", "no acute cardiopulmonary abnormality", "cardiomegaly", "no effusion"]
    counts = bleu_counts(_REFS, hyps)
    assert counts.shape == (8, 10)
    assert coco_bleu4(counts.sum(0)) == pytest.approx(coco_scores(_REFS, hyps)["bleu4"], abs=5e-5)
    sub = [0, 2, 5, 7]  # any subset (a resample's items) is scored as its own corpus
    assert coco_bleu4(counts[sub].sum(0)) == pytest.approx(
        coco_scores([_REFS[i] for i in sub], [hyps[i] for i in sub])["bleu4"], abs=5e-5)


def test_drafting_intervals_known_answers():
    perfect = ReportStats.of(_REFS, _REFS, [(2, 0, 0)] * 8)  # every draft is its reference
    shifted = _REFS[1:] + _REFS[:1]  # every draft is another report
    wrong = ReportStats.of(_REFS, shifted, [(0, 2, 2)] * 8)
    same = paired_intervals(wrong, wrong, 300, 0)
    assert same == {"entity_f1": (0.0, 0.0, 0.0), "bleu4": (0.0, 0.0, 0.0), "rougeL": (0.0, 0.0, 0.0)}
    better = paired_intervals(perfect, wrong, 300, 0)
    assert better["entity_f1"] == (1.0, 1.0, 1.0)  # F1 1 vs 0 on every resample
    assert better["rougeL"][0] == pytest.approx(1.0 - coco_scores(_REFS, shifted)["rougeL"], abs=5e-5)
    assert better["bleu4"][0] == pytest.approx(1.0 - coco_scores(_REFS, shifted)["bleu4"], abs=5e-5)
    for _, lo, hi in better.values():
        assert 0 < lo <= hi <= 1.0 + 1e-9
    worse = paired_intervals(wrong, perfect, 300, 0)
    assert all(hi < 0 for _, _, hi in worse.values())
