"""The preference trainers' loss modules (reward model, DPO) and what they share: pair rows
as training data, a seeded held-out split, and held-out evaluation through the same module.

A pair is one row (its chosen and rejected sides side by side, right-padded to one width)
and one loss unit: a loss module's forward returns the loss summed over its pairs and its
stats summed likewise; the training loop divides by the global batch's pair count and
`evaluate_pairs` by the held-out pair count, so a step's logged stats and the held-out ones
mean the same thing. Both sides go through the model as one batch of 2 x pairs rows.

Rows are right-padded and attention is causal, so no real token ever attends to padding and
no attention mask is needed (the same convention as `modules.SoftPromptLoss`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from components.errors import ConfigError
from components.models.logprobs import sequence_logprobs
from components.models.reward import rewards
from components.train.backends import split_output
from components.train.batches import TrainData
from components.train.losses import DPOVariant, bradley_terry_loss, dpo_loss

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Columns = dict[str, torch.Tensor]


# --------------------------------------------------------------------------- loss modules


class PairwiseRewardLoss(nn.Module):
    """Bradley-Terry loss of a scalar reward model (`losses.bradley_terry_loss`), summed over
    pairs, with the pairwise accuracy (r_chosen > r_rejected) and the reward margin."""

    def __init__(self, model: PreTrainedModel, margin: float = 0.0) -> None:
        super().__init__()
        self.model, self.margin = model, margin

    def enable_gradient_checkpointing(self) -> None:
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, chosen_input_ids: torch.Tensor, rejected_input_ids: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = chosen_input_ids.shape[0]
        both = rewards(self.model, torch.cat([chosen_input_ids, rejected_input_ids]))
        chosen, rejected = both[:pairs], both[pairs:]
        loss_sum = bradley_terry_loss(chosen, rejected, self.margin) * pairs  # a mean over pairs, made a sum
        difference = (chosen - rejected).detach()
        return loss_sum, {"pairwise_accuracy": (difference > 0).float().sum(), "reward_margin": difference.sum()}


class DPOLoss(nn.Module):
    """DPO (`losses.dpo_loss`: sigmoid, ipo or hinge) of a policy against cached reference
    log-probs, summed over pairs, with the implicit rewards beta (log pi - log ref) of each
    side, their margin and the reward accuracy (chosen's above rejected's)."""

    def __init__(self, model: PreTrainedModel, beta: float, variant: DPOVariant = "sigmoid",
                 label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model, self.beta, self.variant, self.label_smoothing = model, beta, variant, label_smoothing

    def enable_gradient_checkpointing(self) -> None:
        self.model.config.use_cache = False
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, chosen_input_ids: torch.Tensor, chosen_labels: torch.Tensor, rejected_input_ids: torch.Tensor,
                rejected_labels: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs = chosen_input_ids.shape[0]
        logps = sequence_logprobs(self.model, torch.cat([chosen_input_ids, rejected_input_ids]),
                                  torch.cat([chosen_labels, rejected_labels]))
        loss, stats = dpo_loss(logps[:pairs], logps[pairs:], ref_chosen_logps.float(), ref_rejected_logps.float(),
                               beta=self.beta, variant=self.variant, label_smoothing=self.label_smoothing)
        sums = {name: value * pairs for name, value in stats.items()}  # means over pairs, made sums
        sums["reward_margin"] = sums["chosen_reward"] - sums["rejected_reward"]
        return loss * pairs, sums


# --------------------------------------------------------------------------- data, split, evaluation


def count_pairs(batch: Columns) -> int:
    return int(batch["chosen_input_ids"].shape[0])


def count_pair_tokens(batch: Columns, pad_token_id: int) -> int:
    """Non-padding tokens of both sides (the throughput figure's tokens)."""
    return int((batch["chosen_input_ids"] != pad_token_id).sum() + (batch["rejected_input_ids"] != pad_token_id).sum())


def pair_train_data(columns: Columns, pad_token_id: int, source: str) -> TrainData:
    """Training data with one row and one loss unit per pair."""
    return TrainData(columns, pad_token_id=pad_token_id, source=source,
                     required=("chosen_input_ids", "rejected_input_ids"), loss_units=count_pairs,
                     real_tokens=lambda batch: count_pair_tokens(batch, pad_token_id))


def split_heldout(columns: Columns, fraction: float, seed: int, source: str) -> tuple[Columns, Columns | None]:
    """(train, held-out) rows: a seeded random `fraction` of the pairs held out (at least one
    when the fraction is positive; the order of rows is kept), or (all, None) when it is 0."""
    rows = count_pairs(columns)
    heldout = max(1, round(rows * fraction)) if fraction > 0 else 0
    if heldout >= rows:
        raise ConfigError(f"{source}: heldout_fraction {fraction} leaves no training pair of the {rows}")
    if heldout == 0:
        return columns, None
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
    train_rows, heldout_rows = order[heldout:].sort().values, order[:heldout].sort().values
    return ({name: tensor[train_rows] for name, tensor in columns.items()},
            {name: tensor[heldout_rows] for name, tensor in columns.items()})


def evaluation_device() -> torch.device:
    """This rank's GPU (LOCAL_RANK under a deepspeed launch), else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def evaluate_pairs(module: nn.Module, columns: Columns, batch_rows: int, device: Any = None) -> dict[str, float]:
    """Mean loss and mean stats per pair of `module` on `columns`: eval mode, no gradients, fp32."""
    device = device or evaluation_device()
    was_training = module.training
    module.to(device).eval()
    loss_sum, stat_sums = 0.0, {}
    with torch.no_grad():
        for start in range(0, count_pairs(columns), batch_rows):
            batch = {name: tensor[start:start + batch_rows].to(device) for name, tensor in columns.items()}
            loss, stats = split_output(module(**batch))
            loss_sum += float(loss)
            for name, value in stats.items():
                stat_sums[name] = stat_sums.get(name, 0.0) + value
    module.train(was_training)
    pairs = count_pairs(columns)
    return {"loss": loss_sum / pairs, **{name: value / pairs for name, value in stat_sums.items()}}
