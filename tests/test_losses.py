"""Each loss of components/train/losses.py against values computed by hand."""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from components.errors import ConfigError
from components.train.losses import (
    ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdvantageEstimator, KLController, PolicyLoss, aggregate_loss,
    aggregation_weight, bradley_terry_loss, dpo_loss, gae_advantages, group_advantages, kl_estimate,
    kl_penalized_rewards, ppo_policy_loss, registered, rloo_advantages, value_loss, whiten,
)


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_bradley_terry_with_and_without_margin() -> None:
    assert bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0)).item() == pytest.approx(-(logsig(1) + logsig(0)) / 2)
    assert bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0), margin=1.0).item() == pytest.approx(-(logsig(0) + logsig(-1)) / 2)


def test_gae_by_hand() -> None:
    rewards, values, mask = t(0, 0, 1)[None], t(0.5, 0.5, 0.5)[None], t(1, 1, 1)[None]
    advantages, returns = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages.tolist() == [[0.5, 0.5, 0.5]] and returns.tolist() == [[1.0, 1.0, 1.0]]
    advantages, _ = gae_advantages(rewards, values, mask, gamma=1.0, lam=0.5)
    assert advantages.tolist() == [[0.125, 0.25, 0.5]]
    padded, _ = gae_advantages(t(0, 1, 0)[None], t(0.5, 0.5, 9.0)[None], t(1, 1, 0)[None], gamma=1.0, lam=0.5)
    assert padded.tolist() == [[0.25, 0.5, 0.0]]  # the padding's value never leaks in


def test_ppo_clipping_both_sides_and_dual_clip() -> None:
    mask = t(1.0)[None]
    loss, stats = ppo_policy_loss(t(math.log(1.5))[None], t(0.0)[None], t(1.0)[None], mask, eps_low=0.2, eps_high=0.2)
    assert loss.item() == pytest.approx(-1.2) and stats["clip_fraction_high"].item() == 1.0
    loss, stats = ppo_policy_loss(t(math.log(1.5))[None], t(0.0)[None], t(1.0)[None], mask, eps_high=0.6)
    assert loss.item() == pytest.approx(-1.5) and stats["clip_fraction_high"].item() == 0.0
    loss, stats = ppo_policy_loss(t(math.log(0.5))[None], t(0.0)[None], t(-1.0)[None], mask, eps_low=0.2)
    assert loss.item() == pytest.approx(0.8) and stats["clip_fraction_low"].item() == 1.0
    loss, _ = ppo_policy_loss(t(math.log(3.0))[None], t(0.0)[None], t(-1.0)[None], mask, dual_clip=2.0)
    assert loss.item() == pytest.approx(2.0)  # max(3, 1.2) = 3, then bounded by -A * 2


def test_value_loss_clipping() -> None:
    mask = t(1.0)[None]
    assert value_loss(t(2.0)[None], t(1.0)[None], t(0.0)[None], mask).item() == pytest.approx(2.0)
    assert value_loss(t(0.5)[None], t(1.0)[None], t(0.0)[None], mask).item() == pytest.approx(0.32)
    assert value_loss(t(0.5)[None], t(1.0)[None], t(0.0)[None], mask, clip_range=None).item() == pytest.approx(0.125)


def test_kl_estimators() -> None:
    logprobs, ref = t(math.log(0.5)), t(math.log(0.25))
    assert kl_estimate(logprobs, ref, "k1").item() == pytest.approx(math.log(2))
    assert kl_estimate(logprobs, ref, "k2").item() == pytest.approx(0.5 * math.log(2) ** 2)
    assert kl_estimate(logprobs, ref, "k3").item() == pytest.approx(-0.5 + math.log(2))
    draws = torch.multinomial(torch.tensor([0.7, 0.3]), 200_000, replacement=True,
                              generator=torch.Generator().manual_seed(0))  # samples of pi
    p, q = torch.log(torch.tensor([0.7, 0.3]))[draws], torch.log(torch.tensor([0.4, 0.6]))[draws]
    exact = 0.7 * math.log(0.7 / 0.4) + 0.3 * math.log(0.3 / 0.6)
    assert kl_estimate(p, q, "k3").mean().item() == pytest.approx(exact, rel=0.02)  # unbiased
    assert kl_estimate(p, q, "k1").mean().item() == pytest.approx(exact, rel=0.05)


def test_group_and_leave_one_out_advantages() -> None:
    rewards = t(1, 0, 0, 1)
    assert group_advantages(rewards, 2, "none").tolist() == [0.5, -0.5, -0.5, 0.5]
    unit = 0.5 / math.sqrt(0.5)  # each group [1, 0] has mean 0.5 and (unbiased) std sqrt(0.5)
    assert group_advantages(rewards, 2, "group_std").tolist() == pytest.approx([unit, -unit, -unit, unit], rel=1e-5)
    assert group_advantages(rewards, 2, "batch_std").tolist() == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], rel=1e-5)
    assert group_advantages(t(1, 1, 0, 0), 2, "group_std").tolist() == [0.0, 0.0, 0.0, 0.0]  # no signal in agreeing groups
    assert rloo_advantages(t(1, 0, 0), 3).tolist() == [1.0, -0.5, -0.5]
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match="a group of one sample has no spread"):
        group_advantages(rewards, 1)


def test_aggregations() -> None:
    per_token, mask = t(1, 1, 0, 2, 0, 0).view(2, 3), t(1, 1, 0, 1, 0, 0).view(2, 3)
    assert aggregate_loss(per_token, mask, "token_mean").item() == pytest.approx(4 / 3)
    assert aggregate_loss(per_token, mask, "sequence_mean").item() == pytest.approx(1.5)
    assert aggregate_loss(per_token, mask, "constant", constant=6).item() == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="needs a positive constant"):
        aggregate_loss(per_token, mask, "constant")


def test_aggregation_weights_make_accumulated_micro_batches_equal_the_batch_loss() -> None:
    """A batch accumulated over micro-batches (GRPO's update pieces), each loss weighted by
    `aggregation_weight`, has the loss of the whole batch under every aggregation."""
    per_token = torch.arange(15, dtype=torch.float64).view(3, 5) / 7
    mask = t(1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0).view(3, 5)
    total_tokens, total_rows, constant = float(mask.sum()), 3, 5 * 3
    for aggregation in ("token_mean", "sequence_mean", "constant"):
        accumulated = sum(
            aggregation_weight(aggregation, float(mask[rows].sum()), mask[rows].shape[0], total_tokens, total_rows)
            * aggregate_loss(per_token[rows], mask[rows], aggregation, constant)
            for rows in (slice(0, 1), slice(1, 3)))
        assert accumulated.item() == pytest.approx(aggregate_loss(per_token, mask, aggregation, constant).item())


def test_whitening_is_over_the_masked_entries_and_zero_off_mask() -> None:
    values, mask = t(1, 2, 3, 100, 6, 7).view(2, 3), t(1, 1, 1, 0, 1, 0).view(2, 3)
    mean, std = 3.0, math.sqrt((4 + 1 + 0 + 9) / 4)  # entries 1, 2, 3, 6: biased variance
    expected = [[(v - mean) / (std + 1e-8) for v in (1, 2, 3)], [0.0, (6 - mean) / (std + 1e-8), 0.0]]
    whitened = whiten(values, mask)
    assert whitened.tolist()[0] == pytest.approx(expected[0]) and whitened.tolist()[1] == pytest.approx(expected[1])
    on_mask = whitened[mask.bool()]
    assert on_mask.mean().item() == pytest.approx(0.0, abs=1e-12) and on_mask.var(unbiased=False).item() == pytest.approx(1.0)


def test_kl_penalised_rewards_put_the_score_on_the_last_response_token() -> None:
    """Ziegler et al. 2019, eq. 2: r_t = -beta KL_t, plus the sequence score at the last token."""
    mask = t(1, 1, 1, 1, 0, 0).view(2, 3)
    kl = t(0.1, 0.2, 0.3, 0.5, 0.0, 0.0).view(2, 3)
    scores = t(1.0, 2.0)
    penalised = kl_penalized_rewards(scores, kl, mask, 0.5).tolist()
    assert penalised[0] == pytest.approx([-0.05, -0.1, -0.15 + 1.0]) and penalised[1] == pytest.approx([-0.25 + 2.0, 0, 0])
    assert kl_penalized_rewards(scores, kl, mask, None).tolist() == [[0.0, 0.0, 1.0], [2.0, 0.0, 0.0]]


def test_kl_controller_is_fixed_without_a_target_and_adaptive_with_one() -> None:
    fixed = KLController(0.1)
    assert fixed.updated(100.0, 10) == fixed
    adaptive = KLController(0.1, target=6.0, horizon=1000)
    assert adaptive.updated(12.0, 100).coef == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped at 0.2
    assert adaptive.updated(5.7, 100).coef == pytest.approx(0.1 * (1 - 0.05 * 0.1))
    assert adaptive.coef == 0.1 and adaptive.updated(5.7, 100).target == 6.0  # a new controller, this one unchanged


def test_formulas_are_picked_by_name_and_an_unknown_name_is_refused() -> None:
    assert set(get_args(AdvantageEstimator)) == set(ADVANTAGE_ESTIMATORS) == {"grpo", "rloo"}
    assert set(get_args(PolicyLoss)) == set(POLICY_LOSSES) == {"ppo_clip"}
    rewards = t(1, 0, 0, 0.5, 0.5, 1)
    for normalize in ("group_std", "batch_std", "none"):
        assert ADVANTAGE_ESTIMATORS["grpo"](rewards, 3, normalize).tolist() == group_advantages(rewards, 3, normalize).tolist()
        assert ADVANTAGE_ESTIMATORS["rloo"](rewards, 3, normalize).tolist() == rloo_advantages(rewards, 3).tolist()
    assert registered(POLICY_LOSSES, "ppo_clip", "policy_loss") is ppo_policy_loss
    with pytest.raises(ConfigError, match=r"^grpo.advantage_estimator: unknown 'ppo'; known: grpo, rloo$"):
        registered(ADVANTAGE_ESTIMATORS, "ppo", "grpo.advantage_estimator")


def test_dpo_variants() -> None:
    args = (t(-1.0), t(-2.0), t(-1.5), t(-1.5))  # h = 0.5 - (-0.5) = 1
    loss, stats = dpo_loss(*args, beta=0.1)
    assert loss.item() == pytest.approx(-logsig(0.1)) and stats["reward_accuracy"].item() == 1.0
    assert dpo_loss(*args, beta=0.1, label_smoothing=0.1)[0].item() == pytest.approx(-0.9 * logsig(0.1) - 0.1 * logsig(-0.1))
    assert dpo_loss(*args, beta=0.1, variant="ipo")[0].item() == pytest.approx(16.0)
    assert dpo_loss(*args, beta=0.1, variant="hinge")[0].item() == pytest.approx(0.9)
