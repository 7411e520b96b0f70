"""Small statistics shared by the harnesses.

Every paired bootstrap here draws its resamples with :func:`bootstrap_indices`, so two calls with
the same item count, resample count and seed resample exactly the same items: the intervals of
several metrics computed on one set of queries (or reports) come from one set of resamples.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Interval = tuple[float, float, float]  # point estimate, 2.5th and 97.5th bootstrap percentiles


def bootstrap_indices(items: int, n: int, seed: int) -> np.ndarray:
    """``n`` resamples (rows) of ``items`` item indices drawn with replacement."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, items, size=(n, items))


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int, seed: int) -> Interval:
    """Mean of a - b over the queries where both count, and its 95% bootstrap interval."""
    ok = ~(np.isnan(a) | np.isnan(b))
    d = (a - b)[ok]
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    means = d[bootstrap_indices(len(d), n, seed)].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def paired_bootstrap_totals(a: np.ndarray, b: np.ndarray, statistic: Callable[[np.ndarray], np.ndarray],
                            n: int, seed: int) -> Interval:
    """statistic(a) - statistic(b) for a corpus-level score, and its 95% paired bootstrap interval.

    ``a`` and ``b`` are (items, k) per-item additive statistics of two methods on the same items
    (e.g. true/false positive counts, n-gram matches); ``statistic`` maps (..., k) column totals
    to the score (vectorised over the leading axes). Each resample draws the items once, with
    :func:`bootstrap_indices` (the resamples :func:`paired_bootstrap` uses for the same item
    count and seed), and recomputes the score of both methods from the totals over it.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two (items, k) arrays of one shape, got {a.shape} and {b.shape}")
    items = len(a)
    if items == 0:
        return float("nan"), float("nan"), float("nan")
    idx = bootstrap_indices(items, n, seed)
    # multiplicity of each item in each resample, (n, items): totals are then one matrix product
    counts = np.bincount((idx + items * np.arange(n)[:, None]).ravel(), minlength=n * items).reshape(n, items)
    diffs = statistic(counts @ a) - statistic(counts @ b)
    point = float(statistic(a.sum(0)) - statistic(b.sum(0)))
    return point, float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))
