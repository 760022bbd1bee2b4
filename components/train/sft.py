"""Supervised fine-tuning / instruction tuning of a causal LM on packed chat examples.

The loss is completion-only (assistant tokens; `components.data.sft_data` masks the rest),
packed examples attend only to themselves (per-document position ids), and the model is
fine-tuned fully or through LoRA adapters (peft; Hu et al. 2021, "LoRA: Low-Rank Adaptation
of Large Language Models", eq. 3: W x + (alpha / r) B A x). The published model is always a
plain transformers model (LoRA merged in), with the adapter alongside in `adapter/`.

The blocks' token ids must come from the model's tokenizer (the published model carries that
tokenizer, so it must be the one its training ids mean): `check_blocks_tokenizer` refuses
blocks another tokenizer made before any training, and the shared fingerprint is recorded in
the metrics.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.records import read_column
from components.errors import ConfigError
from components.models.tokenizers import FINGERPRINT_KEY, check_blocks_tokenizer
from components.train.engine import TrainConfig, TrainData
from components.train.launch import make_job, read_job, run_job
from components.train.loop import OptimConfig
from components.feasibility.model_flops import training_flops_per_token
from components.train.trainer import publish_metrics, summarize, world_size_of

SPEC = ComponentSpec(name="sft", version="1")
ADAPTER_DIR = "adapter"
BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


class LoraSettings(StrictConfig):
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale alpha / r of the adapter update.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class SFTConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size_rows=8, optim=OptimConfig(learning_rate=5e-4, warmup_steps=10)))
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights.")


def load_blocks(blocks_dir: Path) -> dict[str, Any]:
    """The columns of an `sft_data` artifact as tensors: input_ids and labels (a missing one
    is named), and position_ids where the rows are packed."""
    import pyarrow.parquet as pq
    import torch

    from components.records import DATA_DIR

    shards = sorted((blocks_dir / DATA_DIR).glob("part-*.parquet"))
    present = set(pq.read_schema(shards[0]).names) if shards else set()
    names = [name for name in BLOCK_COLUMNS if name != "position_ids" or name in present]
    return {name: torch.tensor(read_column(blocks_dir, name), dtype=torch.long) for name in names}


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm
    from components.train.engine import train
    from components.train.modules import CausalLMLoss

    job_ = read_job(job, SFTConfig)
    config, paths, run_dir, out_dir = job_.config, job_.paths, job_.run_dir, job_.out_dir
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    import torch

    # fp32 master weights: transformers 5 loads a checkpoint in its saved dtype by default
    model = load_causal_lm(paths["model"], attn_implementation="sdpa", dtype=torch.float32)
    columns = load_blocks(paths["blocks"])
    width = int(columns["input_ids"].shape[1])
    if width > model.config.max_position_embeddings:
        raise ConfigError(f"{paths['blocks']}: rows of {width} tokens exceed the model's context "
                          f"({model.config.max_position_embeddings}); lower sft_data.seq_len_tokens")
    flops_per_token = training_flops_per_token(model, width)
    params = sum(p.numel() for p in model.parameters())
    peft_model = None
    if config.lora is not None:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=config.lora.target_modules, task_type="CAUSAL_LM"))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them

    def save_model(module: CausalLMLoss, directory: Path) -> None:
        if peft_model is not None:
            peft_model.save_pretrained(directory / ADAPTER_DIR)
            copy.deepcopy(peft_model).merge_and_unload().save_pretrained(directory)
        else:
            module.model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    result = train(CausalLMLoss(model), TrainData(columns, pad_token_id=tokenizer.pad_token_id, source=str(paths["blocks"])),
                   config.train, run_dir, save_model=save_model, flops_per_token=flops_per_token, final_dir=out_dir,
                   description="sft")
    if result.rank != 0:
        return {}
    return {"params": params, "trainable_params": trainable, "lora": config.lora is not None,
            "epochs": round(config.train.max_steps * config.train.batch_size_rows / len(columns["input_ids"]), 3),
            **summarize(result, run_dir)}


def sft(config: SFTConfig, blocks: str, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Fine-tune `model` (a model artifact in transformers format) on `blocks` (an `sft_data` artifact)."""
    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        fingerprint = check_blocks_tokenizer("blocks", paths["blocks"], "model", paths["model"])
        job = make_job("sft", config, paths, out_dir, dest)
        metrics = {**run_job(job, config.train.distributed, world_size_of(config.train, None)), FINGERPRINT_KEY: fingerprint}
        publish_metrics(Path(job["run_dir"]), out_dir, "Supervised fine-tuning", metrics)
        return metrics

    return produce(SPEC, config, {"blocks": blocks, "model": model}, dest, build, overwrite=overwrite)
