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

from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.records import column_names, read_column
from components.errors import ConfigError
from components.models.tokenizers import FINGERPRINT_KEY, check_blocks_tokenizer
from components.train.batches import TrainData
from components.train.config import TrainConfig
from components.train.launch import Job, Prepared, Trained, TrainerJob, produce_trained
from components.train.optim import OptimConfig
from components.feasibility.model_flops import training_flops_per_token
from components.train.publish import ModelSaver, summarize

SPEC = ComponentSpec(name="sft", version="1")
BLOCK_COLUMNS = ("input_ids", "labels", "position_ids")


# Each family's attention and MLP projections, the layers LoRA adapts unless told otherwise
# (adapting every linear layer of the blocks matches full fine-tuning where attention alone
# does not: Dettmers et al. 2023, "QLoRA", §4, "Default LoRA hyperparameters do not match
# 16-bit performance").
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORA_TARGETS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma2", "olmo2"), _PROJECTIONS),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused q/k/v and gate/up
    "gpt2": ("c_attn", "c_proj", "c_fc"),  # fused q/k/v; c_proj is both attention's and the MLP's output
}


class LoraSettings(StrictConfig):
    r: int = Field(8, gt=0, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scale alpha / r of the adapter update.")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; default: the model family's attention and MLP projections "
                          "(LORA_TARGETS).")


def lora_targets(settings: LoraSettings, model_type: str, model_dir: Path) -> list[str]:
    """The modules to adapt: the configured names, else the family's projections."""
    if settings.target_modules is not None:
        return settings.target_modules
    if model_type not in LORA_TARGETS:
        raise ConfigError(f"{model_dir}: no default LoRA targets for model_type {model_type!r} (known: "
                          f"{', '.join(sorted(LORA_TARGETS))}); set lora.target_modules")
    return list(LORA_TARGETS[model_type])


class SFTConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size_rows=8, optim=OptimConfig(learning_rate=5e-4, warmup_steps=10)))
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights.")


def load_blocks(blocks_dir: Path) -> dict[str, Any]:
    """The columns of an `sft_data` artifact as tensors: input_ids and labels (a missing one
    is named), and position_ids where the rows are packed."""
    import torch

    present = column_names(blocks_dir)
    names = [name for name in BLOCK_COLUMNS if name != "position_ids" or name in present]
    return {name: torch.tensor(read_column(blocks_dir, name), dtype=torch.long) for name in names}


def fit(job: Job) -> Trained:
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm
    from components.train.engine import train
    from components.train.modules import CausalLMLoss

    config, paths = job.config, job.paths
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    import torch

    # fp32 master weights: transformers 5 loads a checkpoint in its saved dtype by default
    model = load_causal_lm(paths["model"], dtype=torch.float32)
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

        targets = lora_targets(config.lora, model.config.model_type, paths["model"])
        peft_model = get_peft_model(model, LoraConfig(
            r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=targets, task_type="CAUSAL_LM"))

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    result = train(CausalLMLoss(model), TrainData(columns, pad_token_id=tokenizer.pad_token_id, source=str(paths["blocks"])),
                   config.train, job.run_dir, save_model=ModelSaver(tokenizer, lora=peft_model),
                   flops_per_token=flops_per_token, final_dir=job.out_dir, description="sft")
    epochs = config.train.max_steps * config.train.batch_size_rows / len(columns["input_ids"])
    return Trained(result.rank, lambda: {"params": params, "trainable_params": trainable, "lora": config.lora is not None,
                                         "epochs": round(epochs, 3), **summarize(result, job.run_dir)})


train_job = TrainerJob(SFTConfig, fit)


def _check_tokenizer(out_dir: Path, paths: dict[str, Path]) -> Prepared:
    return Prepared({FINGERPRINT_KEY: check_blocks_tokenizer("blocks", paths["blocks"], "model", paths["model"])})


def sft(config: SFTConfig, blocks: str, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Fine-tune `model` (a model artifact in transformers format) on `blocks` (an `sft_data` artifact)."""
    return produce_trained(SPEC, config, {"blocks": blocks, "model": model}, dest, "Supervised fine-tuning",
                           overwrite=overwrite, prepare=_check_tokenizer)
