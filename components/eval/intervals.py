"""95 % confidence intervals for accuracies measured on a finite problem set.

Invariant: every interval contains its point estimate and lies in [0, 1].

- `wilson_interval`: a proportion of independent trials (greedy accuracy: one verdict per
  problem). Wilson 1927, "Probable inference, the law of succession, and statistical
  inference" (the score interval; Brown, Cai & DasGupta 2001, Stat. Sci. 16(2), eq. 4):
  (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n). Unlike the normal approximation it
  stays inside [0, 1] and is not degenerate at 0 or n successes, which small models on hard
  benchmarks hit.
- `bootstrap_interval`: the mean of per-problem scores that are not 0/1 trials (pass@k from N
  samples, majority vote over several samples): the percentile bootstrap over problems
  (Efron & Tibshirani 1993, ch. 13), seeded.
"""

from __future__ import annotations

import math
import random

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for `successes` out of `trials`."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes ({successes}) <= trials ({trials}) and trials > 0")
    p = successes / trials
    centre = p + z * z / (2 * trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    scale = 1 + z * z / trials
    return min(p, max(0.0, (centre - half) / scale)), max(p, min(1.0, (centre + half) / scale))  # p in it despite rounding


def bootstrap_interval(scores: list[float], resamples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float]:
    """(low, high) percentile-bootstrap interval of the mean of `scores` (one per problem)."""
    if not scores:
        raise ValueError("no scores to resample")
    rng = random.Random(seed)
    n = len(scores)
    means = sorted(sum(scores[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    mean = sum(scores) / n
    return min(mean, means[int(tail * (resamples - 1))]), max(mean, means[int(math.ceil((1 - tail) * (resamples - 1)))])
