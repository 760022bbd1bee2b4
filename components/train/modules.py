"""Loss modules the training loop optimises: each `forward(**batch)` returns a summed loss.

The loop divides by the global batch's token count, so these return sums, never means.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn

from components.models.chat import IGNORE_INDEX
from components.models.factory import output_logits

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def next_token_loss_sum(hidden: torch.Tensor, labels: torch.Tensor,
                        head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Sum of -log p(label[t+1] | prefix up to t) over positions whose label is not ignored;
    `head` maps decoder states to logits (`factory.output_logits`).

    The output projection runs only on those positions: with a completion-only SFT loss half
    the positions are prompt, and the [tokens, vocab] logits are the largest activation of a
    small model, so skipping them saves time and memory without changing the loss.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    logits = head(hidden[:, :-1][keep]).float()
    return nn.functional.cross_entropy(logits, shift_labels[keep], reduction="sum")


class CausalLMLoss(nn.Module):
    """Next-token loss of a transformers causal LM (full weights or with LoRA layers injected).

    `position_ids` that restart at 0 mark packed documents: transformers then builds a
    block-diagonal causal mask (SDPA, eager) or uses varlen kernels (flash-attention), so
    packed examples never attend to each other.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def enable_gradient_checkpointing(self) -> None:
        self.model.config.use_cache = False
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False,
        ).last_hidden_state
        return next_token_loss_sum(hidden, labels, functools.partial(output_logits, self.model))


class SoftPromptLoss(nn.Module):
    """Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
    Tuning", §2): the model is frozen; k trainable vectors are prepended to every example's
    input embeddings and only they receive gradients.

    Rows are single examples, right-padded: with causal attention, padding after an example
    is never attended to by it, so no attention mask is needed.
    """

    def __init__(self, model: PreTrainedModel, initial_prompt: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        for param in self.model.parameters():
            param.requires_grad_(False)
        self.soft_prompt = nn.Parameter(initial_prompt.detach().clone().float())

    def enable_gradient_checkpointing(self) -> None:
        self.model.config.use_cache = False
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rows, virtual = input_ids.shape[0], self.soft_prompt.shape[0]
        token_embeds = self.model.get_input_embeddings()(input_ids)
        prompt = self.soft_prompt.to(token_embeds.dtype).unsqueeze(0).expand(rows, -1, -1)
        embeds = torch.cat([prompt, token_embeds], dim=1)
        ignored = torch.full((rows, virtual), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
        hidden = self.model.get_decoder()(inputs_embeds=embeds, use_cache=False).last_hidden_state
        return next_token_loss_sum(hidden, torch.cat([ignored, labels], dim=1),
                                   functools.partial(output_logits, self.model))
