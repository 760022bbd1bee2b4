"""Log-probabilities of a model's tokens, computed as training computes them: the decoder runs
over the whole sequence once and the vocabulary projection runs only at the positions scored.

- `completion_logprobs` (the RL trainers): per-token log-probs of a rollout's completion under
  softmax(logits / temperature), TRL's convention, optionally with entropies and a value head.
- `sequence_logprobs` (DPO): each row's summed log-prob of its labelled tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from components.models.chat import IGNORE_INDEX
from components.models.factory import output_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def completion_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int,
                        temperature: float, entropy: bool = False, values_head: Any = None
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Per-token log-probs of the completion tokens ([rows, completion_width]) under
    softmax(logits / temperature); optionally the entropies of those distributions (no grad)
    and a value head's outputs at the same positions (the state before each token)."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                                 use_cache=False).last_hidden_state
    states = hidden[:, prompt_width - 1:-1]  # the state before each completion token predicts it
    logits = output_logits(model, states).float()
    if temperature > 0:
        logits = logits / temperature
    logprobs_all = torch.log_softmax(logits, dim=-1)
    targets = input_ids[:, prompt_width:]
    logprobs = logprobs_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropies = None
    if entropy:
        with torch.no_grad():
            entropies = -(logprobs_all.exp() * logprobs_all).sum(-1)
    values = values_head(states).squeeze(-1).float() if values_head is not None else None
    return logprobs, entropies, values


def sequence_logprobs(model: PreTrainedModel, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[rows] sum over each row's labelled tokens of log p(token | prefix): the sequence
    log-likelihood of the completion that DPO compares (Rafailov et al. 2023, eq. 7, log pi(y|x)).

    As in `modules.next_token_loss_sum`, the vocabulary projection runs only at the labelled
    positions; the per-token log-probs are then summed per row.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = output_logits(model, hidden[:, :-1][keep]).float()
    token_logprobs = -nn.functional.cross_entropy(logits, targets[keep], reduction="none")
    row_of_token = keep.nonzero()[:, 0]
    return torch.zeros(input_ids.shape[0], dtype=token_logprobs.dtype, device=input_ids.device).index_add(
        0, row_of_token, token_logprobs)
