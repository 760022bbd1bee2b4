"""Test-time compute strategies on hand-made sample pools: exact accuracies and compute."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from components.models.sampling import Sample
from components.eval.strategies import evaluate_strategy, majority_answer


def s(text: str, logprob: float = -1.0, tokens: int = 10) -> Sample:
    return Sample(text=text, generated_tokens=tokens, mean_logprob=logprob, finished=True)


POOL = [  # problem 1 (answer 5): correct in samples 2 and 3; problem 2 (answer 7): never
    [s("#### 4", -0.5), s("#### 5", -2.0), s("#### 5", -1.0), s("#### 6", -0.1)],
    [s("#### 1"), s("no idea"), s("#### 2"), s("#### 1")],
]
REFS = ["#### 5", "#### 7"]


def test_oracle_best_of_n_is_pass_at_n_on_disjoint_groups() -> None:
    one = evaluate_strategy("oracle", POOL, REFS, 1, [3, 3], flops_per_token=2.0)
    two = evaluate_strategy("oracle", POOL, REFS, 2, [3, 3], flops_per_token=2.0)
    four = evaluate_strategy("oracle", POOL, REFS, 4, [3, 3], flops_per_token=2.0)
    assert one.accuracy == pytest.approx((2 / 4) / 2)  # problem 1: 2 of 4 singles right
    assert two.accuracy == pytest.approx((2 / 2) / 2)  # groups [4,5] and [5,6] both contain a 5
    assert four.accuracy == pytest.approx(0.5)
    assert four.generated_tokens == 40 and four.inference_flops == (40 + 4 * 3) * 2.0  # prefill per sample


def test_majority_vote_and_logprob_selection() -> None:
    assert majority_answer(POOL[0]) == 5
    assert majority_answer([s("#### 4", -0.5), s("#### 6", -0.1)]) == 6  # a tie goes to the likelier answer
    assert majority_answer([s("nothing"), s("")]) is None
    assert evaluate_strategy("majority", POOL, REFS, 4, [3, 3], 1.0).accuracy == 0.5
    assert evaluate_strategy("best_logprob", POOL, REFS, 4, [3, 3], 1.0).accuracy == 0.0  # picks "#### 6"
    reward = {"#### 5": 1.0}
    best = evaluate_strategy("best_reward", POOL, REFS, 4, [3, 3], 1.0, scorer=lambda x: reward.get(x.text, 0.0))
    assert best.accuracy == 0.5


@pytest.mark.parametrize(("n", "message"), [(0, "at least 1"), (5, "exceeds the 4 samples")])
def test_bad_n_is_a_clear_error(n: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evaluate_strategy("oracle", POOL, REFS, n, [3, 3], 1.0)
