"""Parallelism plans, the DeepSpeed config for a plan, and the search for a plan that fits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.feasibility.flops import Recompute

Precision = Literal["bf16", "fp16", "fp8", "fp32"]
_RECOMPUTE_ORDER: tuple[Recompute, ...] = ("none", "selective", "full")


class ParallelPlan(StrictConfig):
    zero_stage: int = Field(1, ge=0, le=3, description="DeepSpeed ZeRO stage 0-3.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states on CPU (stage >= 1).")
    offload_params: bool = Field(False, description="ZeRO-Infinity: parameters on CPU (stage 3).")
    tensor_parallel: int = Field(1, ge=1)
    pipeline_parallel: int = Field(1, ge=1)
    sequence_parallel: bool = Field(False, description="Megatron sequence parallelism (with tensor parallel).")
    activation_checkpointing: Recompute = "none"
    micro_batch_size: int = Field(1, ge=1, description="Sequences per GPU per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    precision: Precision = "bf16"
    flash_attention: bool = Field(True, description="Fused attention that keeps no s x s scores.")
    dropout: bool = Field(False, description="Dropout layers (they store byte masks).")
    autocast: bool = Field(False, description=(
        "16-bit by torch.autocast over fp32 weights on one process (crucible's trainer without DeepSpeed, "
        "accelerate): fp32 weights and gradients plus a 16-bit copy of each weight, norms keep fp32 tensors. "
        "False: DeepSpeed's bf16/fp16 (16-bit weights, fp32 master copy)."))
    gpus_per_node: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> "ParallelPlan":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("--offload-params needs --zero-stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("--offload-optimizer needs --zero-stage 1, 2 or 3")
        if self.autocast and (self.precision not in ("bf16", "fp16") or self.zero_stage or self.tensor_parallel > 1):
            raise ValueError("autocast is one process's bf16/fp16: it needs --precision bf16 or fp16, ZeRO stage 0 "
                             "and no tensor parallelism")
        return self

    @property
    def mixed_precision(self) -> bool:
        return self.precision != "fp32"

    @property
    def activation_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2


# DeepSpeed has no fp8 switch; an fp8 plan is bf16 mixed precision whose matmuls an fp8 engine
# runs. The note travels in the config (DeepSpeed ignores keys it does not know).
FP8_CONFIG_NOTE = ("fp8 plan: this config trains in bf16; the fp8 matmuls the time estimate assumes need NVIDIA "
                   "Transformer Engine (te.Linear layers under te.fp8_autocast) in the model")


def deepspeed_config(plan: ParallelPlan, data_parallel: int, gradient_clipping: float = 1.0) -> dict[str, Any]:
    """A DeepSpeed config JSON for `plan`, usable as is by `deepspeed.initialize`; an fp8 plan
    enables bf16 and says that the fp8 matmuls come from Transformer Engine."""
    zero: dict[str, Any] = {"stage": plan.zero_stage}
    if plan.zero_stage >= 1:
        zero.update({"overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": 5e8})
    if plan.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if plan.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if plan.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    fp8 = {"crucible_fp8_note": FP8_CONFIG_NOTE} if plan.precision == "fp8" else {}
    return {
        **fp8,
        "train_micro_batch_size_per_gpu": plan.micro_batch_size,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps,
        "train_batch_size": plan.micro_batch_size * plan.gradient_accumulation_steps * data_parallel,
        "gradient_clipping": gradient_clipping,
        "bf16": {"enabled": plan.precision in ("bf16", "fp8")},
        "fp16": {"enabled": plan.precision == "fp16"},
        "zero_optimization": zero,
        "steps_per_print": 100,
    }


Change = tuple[str, Callable[[ParallelPlan, int], tuple[ParallelPlan, int] | None]]


def _raise_zero(plan: ParallelPlan, gpus: int):
    return (plan.model_copy(update={"zero_stage": plan.zero_stage + 1}), gpus) if plan.zero_stage < 3 else None


def _more_recompute(plan: ParallelPlan, gpus: int):
    index = _RECOMPUTE_ORDER.index(plan.activation_checkpointing)
    if index + 1 == len(_RECOMPUTE_ORDER):
        return None
    return plan.model_copy(update={"activation_checkpointing": _RECOMPUTE_ORDER[index + 1]}), gpus


def _halve_micro_batch(plan: ParallelPlan, gpus: int):
    if plan.micro_batch_size % 2:  # keep the global batch: micro x accumulation x data parallel
        return None
    return plan.model_copy(update={
        "micro_batch_size": plan.micro_batch_size // 2,
        "gradient_accumulation_steps": plan.gradient_accumulation_steps * 2,
    }), gpus


def _offload_optimizer(plan: ParallelPlan, gpus: int):
    if plan.offload_optimizer or plan.zero_stage == 0:
        return None
    return plan.model_copy(update={"offload_optimizer": True}), gpus


def _offload_params(plan: ParallelPlan, gpus: int):
    if plan.offload_params or plan.zero_stage != 3 or not plan.offload_optimizer:
        return None
    return plan.model_copy(update={"offload_params": True}), gpus


def _double_gpus(plan: ParallelPlan, gpus: int):
    """More data parallelism, with half the accumulation so the global batch stays the same;
    once accumulation is 1 the global batch doubles (said in the change's description)."""
    if plan.gradient_accumulation_steps % 2 == 0:
        return plan.model_copy(update={"gradient_accumulation_steps": plan.gradient_accumulation_steps // 2}), gpus * 2
    return plan, gpus * 2


# Cheapest first: ZeRO partitioning costs little communication; recomputation costs up to a
# third more compute; a smaller micro-batch lowers utilisation; offload is slow; more GPUs
# cost money. The same order serves single changes and the cumulative fallback.
CHANGES: tuple[Change, ...] = (
    ("raise ZeRO stage", _raise_zero),
    ("more activation checkpointing", _more_recompute),
    ("halve micro-batch, double gradient accumulation", _halve_micro_batch),
    ("offload optimizer states to CPU", _offload_optimizer),
    ("offload parameters to CPU", _offload_params),
    ("double the number of GPUs (global batch kept while accumulation allows)", _double_gpus),
)


def describe(plan: ParallelPlan, gpus: int) -> str:
    extras = [f"offload {what}" for what, on in (("optimizer", plan.offload_optimizer), ("params", plan.offload_params)) if on]
    return (f"{gpus} GPUs, ZeRO-{plan.zero_stage}, checkpointing {plan.activation_checkpointing}, "
            f"micro-batch {plan.micro_batch_size} x {plan.gradient_accumulation_steps} accumulation"
            + "".join(f", {e}" for e in extras))


def search_plan(
    plan: ParallelPlan, gpus: int, fits: Callable[[ParallelPlan, int], bool], max_gpu_factor: int = 64
) -> tuple[list[str], ParallelPlan, int] | None:
    """The smallest change that makes `fits` true: the cheapest single change (repeated,
    e.g. ZeRO 1 -> 2 -> 3) if one suffices, else changes accumulated in cost order."""
    if fits(plan, gpus):
        return [], plan, gpus
    for name, apply in CHANGES:
        steps, current = [], (plan, gpus)
        while (nxt := apply(*current)) is not None and nxt[1] <= gpus * max_gpu_factor:
            current = nxt
            steps.append(f"{name}: {describe(*current)}")
            if fits(*current):
                return steps, *current
    steps, current = [], (plan, gpus)
    for name, apply in CHANGES:
        while (nxt := apply(*current)) is not None and nxt[1] <= gpus * max_gpu_factor:
            current = nxt
            steps.append(f"{name}: {describe(*current)}")
            if fits(*current):
                return steps, *current
    return None
