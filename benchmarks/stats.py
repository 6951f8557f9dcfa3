"""The statistics of the benchmarks' tables: means with standard deviations, rank correlations and
their bootstrap intervals."""

from __future__ import annotations

import random
import statistics

import numpy as np
import scipy.stats


def mean_sd(values: list[float]) -> str:
    """Accuracies (fractions) as "mean ± sd" in points; the sd of one value is nan."""
    sd = statistics.stdev(values) * 100 if len(values) > 1 else float("nan")
    return f"{statistics.mean(values) * 100:.2f} ± {sd:.2f}"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho (ties share their mean rank); 0 when either side is constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(scipy.stats.spearmanr(x, y).statistic)


def kendall(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b; 0 when either side is constant."""
    if len(set(x)) < 2 or len(set(y)) < 2:
        return 0.0
    return float(scipy.stats.kendalltau(x, y).statistic)


def spearman_interval(x: list[float], y: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of Spearman's rho over `draws` resamples of the (x, y) pairs (a
    percentile bootstrap). The resamples are drawn with Python's `random.Random(seed)`, which drew
    the intervals in BENCHMARKS.md."""
    rng = random.Random(seed)
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    values = sorted(spearman(x[i], y[i]) for i in (np.array([rng.randrange(n) for _ in range(n)]) for _ in range(draws)))
    return values[int(0.05 * draws)], values[int(0.95 * draws) - 1]
