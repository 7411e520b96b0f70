"""Ranking metrics against graded ground truth: Recall@K, NDCG@K, RateScore@K (RadIR style).

Why in the core: training validates with the same numbers evaluation reports, so both call this
one implementation (a metric computed two ways drifts). Ground truth ``sim`` is any graded
similarity in [0, 1] (report-mined s_a, label-set agreement, severity agreement).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

Embedder = Callable[[str | None], np.ndarray]  # setting (anatomy or None) -> (n, d) unit rows


@dataclass(frozen=True)
class RankConfig:
    ks: tuple[int, ...] = (1, 5, 10, 50)
    ndcg_ks: tuple[int, ...] = (10, 50)
    rate_k: int = 10
    threshold: float = 0.9  # s above this counts as a hit for Recall@K


@dataclass
class MethodScores:
    recall: dict[str, float] = field(default_factory=dict)
    ndcg: dict[str, float] = field(default_factory=dict)
    ratescore: float = 0.0


def rank_metrics(sim: np.ndarray, scores: np.ndarray, queries: np.ndarray, cfg: RankConfig
                 ) -> tuple[MethodScores, int, float]:
    """Metrics for ``scores`` (len(queries), n) against true ``sim`` (same shape).

    Returns the scores, the number of queries dropped for having no positive, and the oracle
    RateScore. Column ``queries[r]`` of row ``r`` is the query itself and is excluded.
    """
    rows = np.arange(len(queries))
    s = sim.copy()
    sc = scores.astype(np.float64).copy()
    s[rows, queries] = -1.0
    sc[rows, queries] = -np.inf
    kmax = max(max(cfg.ks), max(cfg.ndcg_ks), cfg.rate_k)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :kmax]
    gains = np.take_along_axis(s, order, axis=1).clip(min=0)
    has_pos = np.asarray((s > cfg.threshold).any(1))
    out = MethodScores()
    for k in cfg.ks:
        hit = np.asarray((gains[:, :k] > cfg.threshold).any(1))
        out.recall[f"@{k}"] = float(hit[has_pos].mean()) if has_pos.any() else float("nan")
    ideal = -np.sort(-s.clip(min=0), axis=1)[:, :kmax]
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    for k in cfg.ndcg_ks:
        g, i = gains[:, :k], ideal[:, :k]  # fewer columns than k on a small corpus
        dcg = (g * disc[: g.shape[1]]).sum(1)
        idcg = (i * disc[: i.shape[1]]).sum(1)
        out.ndcg[f"@{k}"] = float(np.mean(np.where(idcg > 0, dcg / np.maximum(idcg, 1e-12), 1.0)))
    out.ratescore = float(gains[:, : cfg.rate_k].mean())
    oracle = float(ideal[:, : cfg.rate_k].mean())
    return out, int((~has_pos).sum()), oracle


