"""Pretrain a causal LM from scratch on packed token blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.data.records import read_column
from components.errors import ConfigError
from components.feasibility.training import require_feasible
from components.models.factory import ModelConfig, build_causal_lm
from components.train.loop import OptimConfig, train_steps

if TYPE_CHECKING:
    import torch

SPEC = ComponentSpec(name="pretrain", version="1")
METRICS_FILE = "train_metrics.jsonl"


class PretrainConfig(StrictConfig):
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    batch_size_blocks: int = Field(16, gt=0, description="Packed blocks per optimizer step.")
    max_steps: int = Field(400, gt=0, description="Optimizer steps.")
    seed: int = 0


def epoch_batches(blocks: "torch.Tensor", batch_size: int, seed: int) -> Iterator[dict[str, "torch.Tensor"]]:
    """Endless batches: a fresh seeded permutation of the blocks each epoch."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(blocks), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            input_ids = blocks[order[start:start + batch_size]]
            yield {"input_ids": input_ids, "labels": input_ids}


def _build(config: PretrainConfig, blocks_dir: Path, tokenizer_dir: Path, estimate_dir: Path, out_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    blocks = torch.tensor(read_column(blocks_dir, "input_ids"), dtype=torch.long)
    seq_len = blocks.shape[1]
    require_feasible(estimate_dir, config.model, seq_len, config.batch_size_blocks, config.max_steps)
    if seq_len > config.model.max_position_embeddings:
        raise ConfigError(
            f"pretrain.model.max_position_embeddings ({config.model.max_position_embeddings}) is shorter "
            f"than the packed blocks ({seq_len} tokens)"
        )
    if len(blocks) < config.batch_size_blocks:
        raise ConfigError(f"pretrain.batch_size_blocks ({config.batch_size_blocks}) exceeds the {len(blocks)} packed blocks")
    torch.manual_seed(config.seed)
    model = build_causal_lm(config.model, tokenizer)
    records = train_steps(
        model, epoch_batches(blocks, config.batch_size_blocks, config.seed), config.max_steps,
        config.optim, out_dir / METRICS_FILE, progress_desc="pretrain",
    )
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    tail = records[-min(10, len(records)):]
    train_time_s = records[-1]["elapsed_s"]
    tokens_trained = sum(r["tokens"] for r in records)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "steps": len(records),
        "tokens_trained": tokens_trained,
        "epochs": round(config.max_steps * config.batch_size_blocks / len(blocks), 3),
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "train_time_s": round(train_time_s, 2),
        "tokens_per_s": round(tokens_trained / train_time_s, 1),
    }


def pretrain(
    config: PretrainConfig, blocks: str, tokenizer: str, estimate: str, dest: str, overwrite: bool = False
) -> Manifest:
    """Train a model from `config.model` on the packed `blocks` artifact; save it in HF format.

    `estimate` is the feasibility estimate of this very run (the `estimate` stage); a run
    it says does not fit the configured devices is refused before any step.
    """
    return produce(
        SPEC, config, {"blocks": blocks, "tokenizer": tokenizer, "estimate": estimate}, dest,
        lambda out_dir, paths: _build(config, paths["blocks"], paths["tokenizer"], paths["estimate"], out_dir),
        overwrite=overwrite,
    )
