"""Pretrain a causal LM from a config on packed token blocks, with the shared training loop."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.records import read_column
from components.errors import ConfigError
from components.feasibility.estimate import ESTIMATE_FILE
from components.feasibility.training import require_feasible
from components.models.factory import ModelConfig, build_causal_lm
from components.models.tokenizers import check_blocks_tokenizer
from components.train.backends import resolve_precision
from components.train.batches import TrainData
from components.train.config import TrainConfig
from components.train.launch import (
    Job, Prepared, Trained, TrainerJob, produce_trained, world_size_of, zero_stage_of,
)
from components.train.publish import ModelSaver, summarize

SPEC = ComponentSpec(name="pretrain", version="2")


class PretrainConfig(StrictConfig):
    model: ModelConfig = ModelConfig()
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(max_steps=400, batch_size_rows=16))


def _blocks_tensor(blocks_dir: Path) -> Any:
    import torch

    return torch.tensor(read_column(blocks_dir, "input_ids"), dtype=torch.long)


def fit(job: Job) -> Trained:
    """One rank's (or the only process's) pretraining run."""
    import torch
    from transformers import AutoTokenizer

    from components.train.engine import train
    from components.train.modules import CausalLMLoss

    config, paths = job.config, job.paths
    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    blocks = _blocks_tensor(paths["blocks"])
    estimate = json.loads((paths["estimate"] / ESTIMATE_FILE).read_text(encoding="utf-8"))
    torch.manual_seed(config.train.seed)
    model = build_causal_lm(config.model, tokenizer)
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    result = train(
        CausalLMLoss(model), TrainData({"input_ids": blocks, "labels": blocks}, source=str(paths["blocks"])),
        config.train, job.run_dir, save_model=ModelSaver(tokenizer), flops_per_token=estimate["flops_per_token"],
        final_dir=job.out_dir, estimate_ds_config=estimate["deepspeed_config"], description="pretrain",
    )
    epochs = config.train.max_steps * config.train.batch_size_rows / len(blocks)
    return Trained(result.rank, lambda: {"params": params, "epochs": round(epochs, 3), **summarize(result, job.run_dir)})


train_job = TrainerJob(PretrainConfig, fit)


def pretrain(
    config: PretrainConfig, blocks: str, tokenizer: str, estimate: str, dest: str, overwrite: bool = False
) -> Manifest:
    """Train a model from `config.model` on the packed `blocks` artifact; save it in HF format.

    `estimate` is the feasibility estimate of this very run (the `estimate` stage): a run it
    says does not fit, or an estimate for other devices, ranks, ZeRO stage or precision than
    the run's, is refused before any step. Without a DeepSpeed config of its own, a
    `deepspeed` launch uses the estimate's recommended one.
    """
    def check(out_dir: Path, paths: dict[str, Path]) -> Prepared:
        import torch

        check_blocks_tokenizer("blocks", paths["blocks"], "tokenizer", paths["tokenizer"])
        blocks_tensor = _blocks_tensor(paths["blocks"])
        seq_len = int(blocks_tensor.shape[1])
        if seq_len > config.model.max_position_embeddings:
            raise ConfigError(
                f"pretrain.model.max_position_embeddings ({config.model.max_position_embeddings}) is shorter "
                f"than the packed blocks ({seq_len} tokens)"
            )
        planned = json.loads((paths["estimate"] / ESTIMATE_FILE).read_text(encoding="utf-8"))
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        run_target = {
            "num_gpus": world_size_of(config.train, planned),
            "zero_stage": zero_stage_of(config.train, planned),
            "precision": resolve_precision(config.train.precision, device),
            "activation_checkpointing": "full" if config.train.gradient_checkpointing else "none",
        }
        require_feasible(paths["estimate"], config.model, seq_len, config.train.batch_size_rows,
                         config.train.max_steps, supported=run_target)
        return Prepared(world_size=run_target["num_gpus"])

    return produce_trained(SPEC, config, {"blocks": blocks, "tokenizer": tokenizer, "estimate": estimate}, dest,
                           "Pretraining", overwrite=overwrite, prepare=check)
