"""The training loop shared by every trainer: AdamW, warmup + decay, clipping, step metrics.

A trainer builds the model and a batch iterator; this module only steps the optimizer and
records what happened, one JSON line per step.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from components.config import StrictConfig
from components.errors import CrucibleError

if TYPE_CHECKING:
    import torch


class TrainingDivergedError(CrucibleError):
    """The loss became NaN or infinite."""


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


def make_optimizer(model: "torch.nn.Module", config: OptimConfig) -> "torch.optim.Optimizer":
    """AdamW with weight decay on parameters of rank >= 2 only (as in nanoGPT / GPT-2)."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2))


def train_steps(
    model: "torch.nn.Module",
    batches: Iterator[dict[str, "torch.Tensor"]],
    max_steps: int,
    config: OptimConfig,
    metrics_path: Path,
    progress_desc: str = "train",
) -> list[dict[str, Any]]:
    """Run `max_steps` optimizer steps; append one JSON record per step to `metrics_path`.

    Each batch is passed to `model(**batch)`, which must return an object with `.loss`;
    `tokens` counts label positions that contribute to the loss.
    """
    import torch
    from tqdm import tqdm

    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, max_steps, config))
    model.train()
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    with open(metrics_path, "a", encoding="utf-8") as sink, tqdm(total=max_steps, desc=progress_desc) as bar:
        for step in range(max_steps):
            batch = next(batches)
            step_started = time.perf_counter()
            loss = model(**batch).loss
            if not torch.isfinite(loss):
                raise TrainingDivergedError(f"loss became {loss.item()} at step {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = config.grad_clip_norm if config.grad_clip_norm is not None else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            step_time_s = time.perf_counter() - step_started
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            record = {
                "step": step + 1,
                "loss": loss.item(),
                "learning_rate": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens / step_time_s,
                "elapsed_s": time.perf_counter() - started,
            }
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}")
            bar.update()
    return records
