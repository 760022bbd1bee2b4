"""FLOPs per token of a transformers model, from the feasibility estimator's formulas (PaLM,
Chowdhery et al. 2022, App. B: 6N + 12·L·H·Q·T for training, its forward third for
inference), so every MFU and FLOPs figure a trainer or evaluator reports counts as the
estimate does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from components.feasibility.flops import attention_flops_per_token_forward, forward_flops_per_token, model_flops_per_token
from components.feasibility.shapes import check_parameter_count, shape_of_config

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def training_flops_per_token(model: PreTrainedModel, seq_len_tokens: int) -> float:
    """The feasibility estimator's training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, App. B),
    for the shape of `model` (checked against its parameter count)."""
    shape = shape_of_config(model.config, seq_len=seq_len_tokens)
    check_parameter_count(shape, sum(p.numel() for p in model.parameters()), model.config.model_type)
    return model_flops_per_token(shape)


def inference_flops_per_token(model: Any, context_tokens: int) -> float:
    """The estimator's forward FLOPs per token, 2N + 4·L·H·Q·T (the training formula's forward third)."""
    return forward_flops_per_token(shape_of_config(model.config, seq_len=context_tokens))


def reward_model_flops_per_token(model_config: Any, seq_len_tokens: int, forward_only: bool = False) -> float:
    """FLOPs per token of a reward model, PaLM App. B's 6N + 12·L·H·Q·T for training (2N +
    4·L·H·Q·T for a forward pass alone), with N the matmul parameters of the decoder and the
    d_model -> 1 score head: the causal LM's N less its vocabulary projection (V·d), which a
    reward model never runs."""
    shape = shape_of_config(model_config, seq_len=seq_len_tokens)
    matmul_parameters = shape.matmul_parameters() - shape.embedding_parameters() + shape.d_model
    passes = 1.0 if forward_only else 3.0  # the backward pass costs twice the forward
    return passes * (2.0 * matmul_parameters + attention_flops_per_token_forward(shape))
