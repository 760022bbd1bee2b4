"""95 % intervals against an oracle computed another way: the Wilson interval is the set of p
the score test does not reject, found here by bisection."""

from __future__ import annotations

import math

import pytest

from components.eval.intervals import Z_95, bootstrap_interval, wilson_interval


def score_test_bound(successes: int, trials: int, upper: bool) -> float:
    """The p where |p_hat - p| = z sqrt(p (1 - p) / n), on the side `upper`, by bisection."""
    p_hat = successes / trials
    low, high = (p_hat, 1.0) if upper else (0.0, p_hat)
    for _ in range(200):
        mid = (low + high) / 2
        rejected = abs(p_hat - mid) > Z_95 * math.sqrt(mid * (1 - mid) / trials)
        if upper:
            low, high = (low, mid) if rejected else (mid, high)
        else:
            low, high = (mid, high) if rejected else (low, mid)
    return (low + high) / 2


@pytest.mark.parametrize("successes,trials", [(0, 200), (3, 200), (50, 200), (137, 200), (200, 200), (1, 3)])
def test_wilson_matches_the_inverted_score_test(successes: int, trials: int) -> None:
    low, high = wilson_interval(successes, trials)
    assert low == pytest.approx(score_test_bound(successes, trials, upper=False), abs=1e-9)
    assert high == pytest.approx(score_test_bound(successes, trials, upper=True), abs=1e-9)
    assert low <= successes / trials <= high


def test_wrong_z_or_counts_are_caught() -> None:
    low, high = wilson_interval(50, 200, z=1.0)  # a 68 % interval is visibly narrower than the oracle's 95 %
    assert high - low < 0.6 * (score_test_bound(50, 200, True) - score_test_bound(50, 200, False))
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_bootstrap_of_zero_one_scores_agrees_with_wilson_and_is_seeded() -> None:
    scores = [1.0] * 60 + [0.0] * 140
    low, high = bootstrap_interval(scores, seed=1)
    w_low, w_high = wilson_interval(60, 200)
    assert abs(low - w_low) < 0.02 and abs(high - w_high) < 0.02
    assert bootstrap_interval(scores, seed=1) == (low, high)
    assert low <= 0.3 <= high
