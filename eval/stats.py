"""Small statistics shared by the harnesses."""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a: np.ndarray, b: np.ndarray, n: int, seed: int) -> tuple[float, float, float]:
    """Mean of a - b over the queries where both count, and its 95% bootstrap interval."""
    ok = ~(np.isnan(a) | np.isnan(b))
    d = (a - b)[ok]
    if len(d) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n, len(d)))].mean(1)
    return float(d.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
