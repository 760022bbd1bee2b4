"""Every RL and preference objective, as small functions on tensors with masks.

Shapes: `[batch, tokens]` for per-token quantities with a `mask` of the same shape (1 on
response tokens that count, 0 on prompt and padding); `[batch]` for per-sequence ones. The
trainers (reward model, PPO, DPO, GRPO) only combine these, and pick advantage estimators and
policy losses by name from the registries at the end (as verl's `core_algos` does). Each
function cites the paper and equation it implements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F

from components.errors import ConfigError

Aggregation = Literal["token_mean", "sequence_mean", "constant"]
KLEstimator = Literal["k1", "k2", "k3"]
GroupNorm = Literal["group_std", "batch_std", "none"]
DPOVariant = Literal["sigmoid", "ipo", "hinge"]
AdvantageEstimator = Literal["grpo", "rloo"]  # the names of ADVANTAGE_ESTIMATORS
PolicyLoss = Literal["ppo_clip"]  # the names of POLICY_LOSSES


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Reward-model loss, -log sigmoid(r_chosen - r_rejected - margin), mean over pairs.

    Bradley & Terry 1952; Ouyang et al. 2022 (InstructGPT) eq. 1; the margin term is Llama 2's
    (Touvron et al. 2023, eq. 2).
    """
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin).mean()


def gae_advantages(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
                   lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16):
    A_t = sum_l (gamma lam)^l delta_{t+l}, delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after
    the last response token. Returns (advantages, returns = advantages + values), zero off-mask.
    """
    mask = mask.to(values.dtype)
    advantages = torch.zeros_like(values)
    last = torch.zeros(values.shape[0], dtype=values.dtype, device=values.device)
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] * mask[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    eps_low: float = 0.2, eps_high: float = 0.2, dual_clip: float | None = None,
                    aggregation: Aggregation = "token_mean", constant: float | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate (Schulman et al. 2017, eq. 7) with separate lower / upper clip ranges
    (DAPO's clip-higher, Yu et al. 2025, eq. 10) and optional dual clip for negative advantages
    (Ye et al. 2020, eq. 5: the loss is bounded by -dual_clip * A). Returns (loss, stats) with
    the fractions of tokens clipped below and above.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        if dual_clip <= 1:
            raise ValueError(f"dual_clip must exceed 1, got {dual_clip}")
        per_token = torch.where(advantages < 0, torch.minimum(per_token, -advantages * dual_clip), per_token)
    stats = {
        "clip_fraction_low": masked_mean(((ratio < 1 - eps_low) & (advantages < 0)).float(), mask),
        "clip_fraction_high": masked_mean(((ratio > 1 + eps_high) & (advantages > 0)).float(), mask),
    }
    return aggregate_loss(per_token, mask, aggregation, constant), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float | None = 0.2) -> torch.Tensor:
    """0.5 (V - R)^2, with PPO's value clipping (Schulman et al.'s baselines implementation;
    Andrychowicz et al. 2021, §3.2): max of the clipped and unclipped squared errors."""
    error = (values - returns) ** 2
    if clip_range is not None:
        clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        error = torch.maximum(error, (clipped - returns) ** 2)
    return 0.5 * masked_mean(error, mask)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman 2020, "Approximating
    KL divergence"): k1 = -log r, k2 = (log r)^2 / 2, k3 = (r - 1) - log r with r = pi_ref / pi
    (k3: unbiased and always >= 0, GRPO's choice, Shao et al. 2024, eq. 4)."""
    log_ratio = ref_logprobs - logprobs  # log r
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    return torch.exp(log_ratio) - 1 - log_ratio


def group_advantages(rewards: torch.Tensor, group_size: int, normalize: GroupNorm = "group_std",
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO's outcome advantages (Shao et al. 2024, §4.1.2): reward minus its group's mean,
    divided by the group's std (GRPO), the batch's std, or nothing (Dr. GRPO, Liu et al. 2025,
    §3). `rewards` is [groups * group_size], consecutive samples forming a group."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    if group_size < 2 and normalize != "none":
        raise ValueError("a group of one sample has no spread: use group_size >= 2 or normalize='none'")
    grouped = rewards.view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize == "group_std":
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    elif normalize == "batch_std":
        centered = centered / (rewards.std() + eps)
    return centered.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, eq. 5): each sample's
    baseline is the mean reward of the other k-1 samples of its prompt."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.view(-1, group_size)
    others = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1)


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the masked entries of the whole batch, zero off-mask: PPO's
    advantage normalisation (as in OpenAI baselines' PPO, TRL's `masked_whiten`, OpenRLHF and
    verl). The variance is the biased masked mean of squared deviations, and eps is added
    to the std (TRL adds it to the variance, and uses the unbiased variance)."""
    mean = masked_mean(values, mask)
    std = masked_mean((values - mean) ** 2, mask).sqrt()
    return (values - mean) / (std + eps) * mask


def kl_penalized_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float | None) -> torch.Tensor:
    """Per-token rewards [batch, tokens] from sequence scores [batch]: -kl_coef x the per-token
    KL estimate `kl` on every token (Ziegler et al. 2019, eq. 2; Ouyang et al. 2022, eq. 2; TRL's
    PPOTrainer), plus the score on the last response token. `kl_coef=None`: the KL is not in
    the reward (a loss term instead), only the score is placed."""
    rewards = torch.zeros_like(kl)
    if kl_coef is not None:
        rewards -= kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(len(last)), last] += scores
    return rewards


def adaptive_kl_coef(coef: float, measured_kl: float, target: float, samples: int, horizon: int) -> float:
    """Ziegler et al. 2019, §2.2: e = clip(KL / KL_target - 1, -0.2, 0.2); beta <- beta (1 + K_beta e),
    with K_beta = samples / horizon."""
    error = min(max(measured_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)


@dataclass(frozen=True)
class KLController:
    """The KL coefficient beta: fixed (`target` None) or adaptive (Ziegler et al. 2019, §2.2:
    moved after each batch so the measured KL per sequence tracks `target`)."""

    coef: float
    target: float | None = None
    horizon: int = 10_000  # samples

    def updated(self, measured_kl: float, samples: int) -> KLController:
        """The controller after a batch of `samples` sequences whose mean KL was `measured_kl`."""
        if self.target is None:
            return self
        return replace(self, coef=adaptive_kl_coef(self.coef, measured_kl, self.target, samples, self.horizon))


def aggregation_weight(aggregation: Aggregation, tokens: float, rows: int, total_tokens: float,
                       total_rows: int) -> float:
    """The weight of one micro-batch's loss (`tokens` response tokens in `rows` sequences) when a
    batch of `total_tokens` in `total_rows` is accumulated over micro-batches, so that the
    weighted sum equals `aggregate_loss` of the whole batch: its share of the tokens
    (token_mean), of the sequences (sequence_mean), or 1 (constant: the constant already
    divides by the whole batch's size)."""
    if aggregation == "token_mean":
        return tokens / total_tokens
    if aggregation == "sequence_mean":
        return rows / total_rows
    return 1.0


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, aggregation: Aggregation = "token_mean",
                   constant: float | None = None) -> torch.Tensor:
    """Reduce a per-token loss: `token_mean` over all response tokens of the batch (DAPO, Yu et
    al. 2025, eq. 12), `sequence_mean` (mean per sequence, then over sequences: GRPO, Shao et al.
    2024, eq. 3), or `constant`: the sum divided by a fixed number (Dr. GRPO, Liu et al. 2025,
    eq. 3: the maximum response length times the batch size), free of length bias."""
    mask = mask.to(per_token.dtype)
    if aggregation == "token_mean":
        return masked_mean(per_token, mask)
    if aggregation == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).mean()
    if constant is None or constant <= 0:
        raise ValueError("aggregation 'constant' needs a positive constant (e.g. max_tokens * batch)")
    return (per_token * mask).sum() / constant


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, variant: DPOVariant = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Direct preference optimisation on sequence log-probs. With
    h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)):
    - sigmoid: -log sigmoid(beta h) (Rafailov et al. 2023, eq. 7); with label smoothing e,
      -(1-e) log sigmoid(beta h) - e log sigmoid(-beta h) (conservative DPO, Mitchell 2023);
    - ipo: (h - 1/(2 beta))^2 (Azar et al. 2023, eq. 17);
    - hinge: max(0, 1 - beta h) (SLiC, Zhao et al. 2023, eq. 1).
    Returns (mean loss, stats: implicit rewards and reward accuracy)."""
    chosen_reward = policy_chosen - ref_chosen
    rejected_reward = policy_rejected - ref_rejected
    h = chosen_reward - rejected_reward
    if variant == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif variant == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        losses = torch.relu(1 - beta * h)
    stats = {"chosen_reward": beta * chosen_reward.detach().mean(), "rejected_reward": beta * rejected_reward.detach().mean(),
             "reward_accuracy": (h.detach() > 0).float().mean()}
    return losses.mean(), stats


# Registries (as verl's `core_algos`): a recipe picks its formulas by name from its config.
AdvantageFunction = Callable[[torch.Tensor, int, GroupNorm], torch.Tensor]  # (rewards, group_size, normalize)
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFunction] = {
    "grpo": group_advantages,
    # RLOO's leave-one-out baseline is not scaled: `normalize` is GRPO's option (verl ignores it too)
    "rloo": lambda rewards, group_size, normalize: rloo_advantages(rewards, group_size),
}
POLICY_LOSSES = {"ppo_clip": ppo_policy_loss}


def registered(registry: dict[str, Callable], name: str, field: str) -> Callable:
    """`registry[name]`; an unknown name is refused naming the config `field` and the known names."""
    if name not in registry:
        raise ConfigError(f"{field}: unknown {name!r}; known: {', '.join(sorted(registry))}")
    return registry[name]
