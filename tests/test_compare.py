"""When RL beats best-of-n: the break-even query volume and the per-volume verdicts."""

from __future__ import annotations

import pytest

from components.eval.compare import rl_versus_best_of_n


def point(method: str, n: int, accuracy: float, flops: float) -> dict:
    return {"model": "m", "method": method, "n": n, "accuracy": accuracy, "flops_per_query": flops}


SFT = [point("oracle", 1, 0.20, 100.0), point("oracle", 4, 0.60, 400.0),  # the answer key: never a rival
       point("majority", 2, 0.25, 200.0), point("majority", 4, 0.40, 400.0), point("best_logprob", 8, 0.45, 800.0),
       point("greedy+calculator", 1, 0.95, 100.0)]  # a tool: compared elsewhere


def test_break_even_is_training_over_the_saved_inference() -> None:
    rl = [point("oracle", 1, 0.40, 100.0)]
    lines, metrics = rl_versus_best_of_n(SFT, rl, training_flops=30_000.0, volumes=[10, 1000])
    # the SFT model first reaches 0.40 with majority@4 at 400 FLOPs: RL saves 300 per query
    assert metrics["breakeven_queries"] == pytest.approx(30_000.0 / 300.0)
    assert metrics["sft_best_deployable_method"] == "best_logprob@8"
    # 10 queries: RL costs 100 + 3000 = 3100 per query, beyond the largest n measured (800),
    # where best_logprob@8 already beats it
    assert "10 queries" in lines[-2] and "best_logprob@8 = 0.4500; **best-of-n / majority wins**" in lines[-2]
    assert "4x the compute of the largest n measured" in lines[-2]
    # 1000 queries: RL costs 130; the SFT model can afford only oracle@1 = 0.20 there
    assert "oracle@1 = 0.2000" in lines[-1] and "**RL wins**" in lines[-1]


def test_best_of_n_wins_where_rl_is_less_accurate_than_what_the_budget_buys() -> None:
    rl = [point("oracle", 1, 0.30, 100.0)]
    lines, metrics = rl_versus_best_of_n(SFT, rl, training_flops=1_000_000.0, volumes=[2000])
    # RL costs 100 + 500 = 600 per query; within 600 the SFT model's majority@4 gives 0.40 > 0.30
    assert "majority@4 = 0.4000" in lines[-1] and "best-of-n / majority wins" in lines[-1]
    assert metrics["breakeven_queries"] == pytest.approx(1_000_000.0 / 300.0)  # majority@4 (400) vs RL (100)


def test_no_break_even_where_the_sft_model_matches_rl_for_less_inference() -> None:
    """An SFT method as accurate as the RL model at no more FLOPs per query than the RL model's
    own inference: RL's training is never paid back (this once read "cheaper above 0 queries")."""
    rl = [point("oracle", 1, 0.20, 150.0)]
    lines, metrics = rl_versus_best_of_n(SFT, rl, training_flops=30_000.0, volumes=[1_000_000])
    assert metrics["breakeven_queries"] is None
    assert "oracle@1 at 100 FLOPs per query" in lines[-2] and "**RL is cheaper at no query volume**" in lines[-2]
    assert "**best-of-n / majority wins**" in lines[-1]  # even at a million queries
