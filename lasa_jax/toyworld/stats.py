"""The statistics of the toy world's arm comparison (world.py, v4 evaluation protocol), in numpy.

- `wilson`: the Wilson score interval of a binomial proportion (no continuity correction).
- `mcnemar`: the exact paired McNemar test of two arms on the same prompts (two-sided binomial
  test of the discordant pairs at 1/2; mid-p is not used).
- `cluster_bootstrap`: a percentile bootstrap that resamples clusters (here: queries, each with
  all its languages and arms' outcomes) with replacement and recomputes a statistic.

Tested against scipy.stats (binomtest and its Wilson interval) and hand-worked values.
"""
from __future__ import annotations

import math
from typing import Callable, Hashable, Sequence

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float] | tuple[None, None]:
    """(low, high) of the Wilson score interval for k successes in n trials; (None, None) if n = 0."""
    if n == 0:
        return None, None
    if not 0 <= k <= n:
        raise ValueError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def binom_cdf_half(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exact (integer arithmetic)."""
    if k < 0:
        return 0.0
    k = min(k, n)
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Exact McNemar test of paired outcomes a[i], b[i] (True = success). Returns the discordant
    counts (a_only = a succeeds and b fails, b_only the reverse), the n of pairs and the two-sided
    p = min(1, 2 P(X <= min(a_only, b_only))), X ~ Bin(a_only + b_only, 1/2); p = 1 without
    discordant pairs."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"mcnemar: paired 1-D outcomes of equal length expected, got {a.shape} and {b.shape}")
    a_only = int(np.sum(a & ~b))
    b_only = int(np.sum(~a & b))
    m = a_only + b_only
    p = 1.0 if m == 0 else min(1.0, 2.0 * binom_cdf_half(min(a_only, b_only), m))
    return {"n": int(a.size), "a_only": a_only, "b_only": b_only, "p": p}


def cluster_bootstrap(clusters: Sequence[Hashable], statistic: Callable[[np.ndarray], float], *,
                      draws: int = 2000, seed: int = 0, ci: float = 0.95) -> dict:
    """Percentile bootstrap of `statistic(rows)` (rows: an index array into the data) resampling
    whole clusters with replacement; a cluster drawn twice contributes its rows twice. Returns
    {"estimate", "low", "high", "draws"}; draws whose statistic is undefined (None/NaN, e.g. a
    tier with no rows) are dropped and counted in "undefined"."""
    if not 0 < ci < 1:
        raise ValueError(f"cluster_bootstrap: ci must be in (0, 1), got {ci}")
    clusters = list(clusters)
    names = sorted(set(clusters), key=str)
    index = {c: i for i, c in enumerate(names)}
    codes = np.array([index[c] for c in clusters], np.int64)
    members = [np.flatnonzero(codes == i) for i in range(len(names))]
    estimate = statistic(np.arange(len(clusters)))
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(draws):
        pick = rng.integers(0, len(names), len(names))
        rows = np.concatenate([members[i] for i in pick]) if len(pick) else np.zeros(0, np.int64)
        v = statistic(rows)
        if v is not None and not np.isnan(v):
            vals.append(float(v))
    alpha = (1 - ci) / 2
    lo, hi = (np.quantile(vals, [alpha, 1 - alpha]).tolist() if vals else (None, None))
    return {"estimate": None if estimate is None else float(estimate), "low": lo, "high": hi,
            "draws": len(vals), "undefined": draws - len(vals)}
