"""Optimizer and learning-rate schedule every trainer shares (AdamW, warmup then cosine or linear decay)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field

from components.config import StrictConfig

if TYPE_CHECKING:
    import torch


class OptimConfig(StrictConfig):
    learning_rate: float = Field(2e-3, gt=0, description="Peak learning rate after warmup.")
    weight_decay: float = Field(0.1, ge=0, description="Decoupled weight decay on matrices (not norms/biases).")
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.95, gt=0, lt=1)
    warmup_steps: int = Field(20, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final learning rate as a fraction of the peak.")
    grad_clip_norm: float | None = Field(1.0, gt=0, description="Clip the global grad norm; null disables.")


def lr_multiplier(step: int, max_steps: int, config: OptimConfig) -> float:
    """Linear warmup to 1, then cosine (Loshchilov & Hutter 2017, eq. 5) or linear decay to
    `min_lr_ratio` at `max_steps`. `step` counts optimizer steps from 0."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, max_steps - config.warmup_steps)
    progress = min(1.0, progress)
    if config.lr_schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        decay = 1.0 - progress
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * decay


def make_optimizer(model: "torch.nn.Module", config: OptimConfig, fused: bool = False) -> "torch.optim.Optimizer":
    """AdamW with weight decay on parameters of rank >= 2 only (as in nanoGPT / GPT-2).

    `fused` uses torch's single-kernel AdamW (CPU and CUDA; the same update as the
    per-tensor one, several times faster per step on a CPU); DeepSpeed ranks keep the
    default, since ZeRO re-groups the parameters it is given.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2),
                             fused=fused or None)
