"""The estimator as a gate for the training stages: estimate the run a trainer config
describes on the configured devices, and refuse a run that does not fit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce, read_manifest
from components.config import StrictConfig, validate_config
from components.feasibility.estimate import (
    ESTIMATE_FILE, FeasibilityConfig, ModelSource, NotFeasibleError, summary_metrics, estimate, write_estimate,
)
from components.feasibility.flops import Recompute
from components.feasibility.plan import ParallelPlan, Precision
from components.feasibility.shapes import ModelShape, shape_from_hf_config
from components.models.factory import ModelConfig, hf_config

SPEC = ComponentSpec(name="estimate_training", version="1")


class TrainingTarget(StrictConfig):
    """The devices a training stage will run on."""

    gpu: str = Field("CPU", description="Accelerator name from the catalog.")
    num_gpus: int = Field(1, ge=1)
    zero_stage: int = Field(0, ge=0, le=3)
    precision: Precision = "fp32"
    activation_checkpointing: Recompute = "none"
    mfu: float = Field(0.4, gt=0, le=1)
    price_per_gpu_hour: float | None = Field(None, ge=0)
    usable_memory_fraction: float = Field(0.9, gt=0, le=1)
    hardware_catalog: str | None = None


class TrainingEstimateConfig(StrictConfig):
    target: TrainingTarget
    model: ModelConfig
    seq_len_tokens: int = Field(gt=0)
    batch_size_blocks: int = Field(gt=0)
    max_steps: int = Field(gt=0)


def model_shape(model: ModelConfig, vocab_size: int, seq_len_tokens: int) -> ModelShape:
    """The shape pretrain will build: Llama's from the config's fields; another family's read
    from its transformers config (`shapes.shape_from_hf_config`, which checks the parameter
    count against the instantiated model), so its biases, norms and MLP are counted."""
    if model.architecture != "llama":
        no_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # ids do not change the count
        return shape_from_hf_config(hf_config(model, vocab_size, no_ids), seq_len_tokens)[0]
    return ModelShape(
        num_layers=model.num_layers, d_model=model.hidden_size, num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads, ffn_dim=model.intermediate_size, vocab_size=vocab_size,
        seq_len=seq_len_tokens, mlp="swiglu", tie_word_embeddings=model.tie_word_embeddings,
    )


def feasibility_config(config: TrainingEstimateConfig, vocab_size: int) -> FeasibilityConfig:
    target = config.target
    data_parallel = target.num_gpus
    micro_batch = max(1, config.batch_size_blocks // data_parallel)
    return FeasibilityConfig(
        model=ModelSource(shape=model_shape(config.model, vocab_size, config.seq_len_tokens)),
        tokens=float(config.max_steps * config.batch_size_blocks * config.seq_len_tokens),
        gpu=target.gpu, num_gpus=target.num_gpus, mfu=target.mfu, price_per_gpu_hour=target.price_per_gpu_hour,
        usable_memory_fraction=target.usable_memory_fraction, hardware_catalog=target.hardware_catalog,
        plan=ParallelPlan(
            zero_stage=target.zero_stage, precision=target.precision,
            activation_checkpointing=target.activation_checkpointing, micro_batch_size=micro_batch,
            gradient_accumulation_steps=max(1, config.batch_size_blocks // (micro_batch * data_parallel)),
            gpus_per_node=target.num_gpus,
        ),
    )


def estimate_training(config: TrainingEstimateConfig, tokenizer: str, dest: str, overwrite: bool = False) -> Manifest:
    """Estimate the pretraining run `config` describes, with the vocabulary of `tokenizer`."""
    inputs = {"tokenizer": tokenizer}
    if config.target.hardware_catalog:
        inputs["hardware_catalog"] = config.target.hardware_catalog

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        from transformers import AutoTokenizer

        vocab_size = len(AutoTokenizer.from_pretrained(paths["tokenizer"]))
        result = estimate(feasibility_config(config, vocab_size))
        write_estimate(result, out_dir)
        return summary_metrics(result)

    return produce(SPEC, config, inputs, dest, build, overwrite=overwrite)


# What the single-process trainer runs today; an estimate for anything else would approve a
# run the trainer does not make.
SINGLE_PROCESS_TARGET = {"num_gpus": 1, "zero_stage": 0, "precision": "fp32", "activation_checkpointing": "none"}


def require_feasible(estimate_dir: Path, model: ModelConfig, seq_len_tokens: int, batch_size_blocks: int,
                     max_steps: int, supported: dict[str, Any] = SINGLE_PROCESS_TARGET) -> dict[str, Any]:
    """The gate: the estimate must describe this run, on a target the trainer supports, and
    say it fits; returns the estimate."""
    manifest = read_manifest(str(estimate_dir))
    if manifest.component.name != SPEC.name:
        raise NotFeasibleError(f"{estimate_dir}: expected a training estimate ({SPEC.name}), found {manifest.component.name}")
    planned = validate_config(TrainingEstimateConfig, manifest.config, f"{estimate_dir}/manifest.json: config")
    unsupported = [f"estimate.{key}={getattr(planned.target, key)!r} (trainer runs {value!r})"
                   for key, value in supported.items() if getattr(planned.target, key) != value]
    if unsupported:
        raise NotFeasibleError(f"the trainer cannot run the estimated target: {', '.join(unsupported)}")
    run = {"model": model, "seq_len_tokens": seq_len_tokens, "batch_size_blocks": batch_size_blocks, "max_steps": max_steps}
    differing = [key for key, value in run.items() if getattr(planned, key) != value]
    if differing:
        raise NotFeasibleError(
            f"{estimate_dir}: the estimate is for a different run ({', '.join(differing)} differ); re-run the estimate stage"
        )
    result = json.loads((estimate_dir / ESTIMATE_FILE).read_text(encoding="utf-8"))
    if not result["fits"]:
        memory = result["memory_per_gpu_gib"]["total"]
        raise NotFeasibleError(
            f"run does not fit {planned.target.num_gpus} x {planned.target.gpu}: {memory:.2f} GiB per device needed, "
            f"{result['memory_limit_gib']:.2f} GiB usable; recommendation: {result['recommendation']['summary']}"
        )
    return result
