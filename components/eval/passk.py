"""pass@k: the probability that at least one of k samples is correct, estimated from n >= k
samples of which c are correct, without bias.

Chen et al. 2021, "Evaluating Large Language Models Trained on Code", eq. 1 and its
numerically stable form (Fig. 3): pass@k = 1 - C(n-c, k) / C(n, k)
= 1 - prod_{i=n-c+1}^{n} (1 - k / i). The plain estimator 1 - (1 - c/n)^k is biased low.
"""

from __future__ import annotations

from collections.abc import Sequence

from components.errors import ConfigError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with `c` correct out of `n` samples."""
    if n < 1:
        raise ConfigError(f"pass@k needs at least one sample per problem (n={n})")
    if not 0 <= c <= n:
        raise ConfigError(f"pass@k: correct count c={c} must lie in [0, n={n}]")
    if not 1 <= k <= n:
        raise ConfigError(f"pass@k: k={k} must lie in [1, n={n}] (k > n samples cannot be estimated)")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(correct_per_problem: Sequence[int], n: int, ks: Sequence[int]) -> dict[int, float]:
    """Mean pass@k over problems, each with `n` samples and the given number correct."""
    if not correct_per_problem:
        raise ConfigError("pass@k over an empty set of problems")
    return {k: sum(pass_at_k(n, c, k) for c in correct_per_problem) / len(correct_per_problem) for k in ks}
