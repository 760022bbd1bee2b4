"""What to train with a FLOP budget: the compute-optimal size and data from a scaling law, a
concrete dense shape of about that size, and (on named hardware) its time, cost and memory plan.

The shape follows a stated rule, not a search over architectures: d_model is `aspect_ratio`
times the layer count (default 128, as GPT-3 175B's 12288 / 96 and Llama 3 405B's 16384 / 126;
Kaplan et al. 2020, Fig. 5, find the loss within a few per cent over a wide range of aspect
ratios), heads of `head_dim` (128), multi-head attention, a SwiGLU MLP of 8/3 d_model rounded
up to a multiple of 256 (Llama), untied embeddings; the layer count is the one whose exact
parameter count is nearest N*.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.feasibility.estimate import (
    ESTIMATE_FILE, REPORT_FILE, FeasibilityConfig, ModelSource, estimate, fmt, render_markdown,
)
from components.feasibility.flops import model_flops_per_token
from components.feasibility.plan import ParallelPlan
from components.feasibility.scaling import LAW_SOURCES, ScalingLaw, compute_optimal
from components.feasibility.shapes import ModelShape

SPEC = ComponentSpec(name="estimate_budget", version="1")
MAX_LAYERS = 512


class BudgetConfig(StrictConfig):
    """A FLOP budget, the rule for the suggested shape, and optionally the hardware to run it on."""

    compute_budget_flops: float = Field(gt=0, description="Training FLOPs available (C = 6ND).")
    scaling_law: ScalingLaw = "epoch2024"
    aspect_ratio: float = Field(128.0, gt=0, description="d_model / layers of the suggested shape.")
    head_dim: int = Field(128, gt=0, description="Width of each attention head of the suggested shape.")
    vocab_size: int = Field(32000, gt=0, description="Vocabulary of the suggested shape (Chinchilla's 32k).")
    seq_len: int = Field(2048, gt=0, description="Training sequence length (Chinchilla's 2048).")
    gpu: str | None = Field(None, description="Accelerator for time, cost and memory (none: sizing only).")
    num_gpus: int = Field(8, ge=1)
    plan: ParallelPlan = ParallelPlan()
    mfu: float = Field(0.4, gt=0, le=1)
    price_per_gpu_hour: float | None = Field(None, ge=0)
    usable_memory_fraction: float = Field(0.9, gt=0, le=1)
    hardware_catalog: str | None = None


def shape_for_layers(layers: int, config: BudgetConfig) -> ModelShape:
    heads = max(1, round(config.aspect_ratio * layers / config.head_dim))
    d_model = heads * config.head_dim
    ffn = 256 * math.ceil(8 * d_model / 3 / 256)  # Llama's SwiGLU width: 2/3 of 4d, to a multiple of 256
    return ModelShape(num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=heads, head_dim=config.head_dim,
                      ffn_dim=ffn, vocab_size=config.vocab_size, seq_len=config.seq_len)


def dense_shape_near(params: float, config: BudgetConfig) -> ModelShape:
    """The shape of the rule whose exact parameter count is nearest `params` (in ratio)."""
    shapes = (shape_for_layers(layers, config) for layers in range(1, MAX_LAYERS + 1))
    return min(shapes, key=lambda shape: abs(math.log(shape.parameter_count() / params)))


def shape_rule(config: BudgetConfig) -> str:
    return (f"d_model = {config.aspect_ratio:g} x layers rounded to heads of {config.head_dim}, multi-head attention, "
            f"SwiGLU ffn = 8/3 d_model rounded up to 256, untied embeddings, vocab {config.vocab_size}, "
            f"sequence {config.seq_len}; the layer count whose parameters are nearest N*")


def advise(config: BudgetConfig) -> dict[str, Any]:
    """N*, D*, predicted loss and the law; the suggested shape; with a GPU, its estimate on D* tokens."""
    optimal = compute_optimal(config.compute_budget_flops, config.scaling_law)
    shape = dense_shape_near(optimal["params"], config)
    result: dict[str, Any] = {
        "compute_budget_flops": config.compute_budget_flops,
        "scaling_law": config.scaling_law,
        "law": LAW_SOURCES[config.scaling_law],
        **optimal,
        "tokens_per_param": optimal["tokens"] / optimal["params"],
        "shape": shape.model_dump(mode="json"),
        "shape_rule": shape_rule(config),
        "shape_params": shape.parameter_count(),
        "shape_flops_per_token": model_flops_per_token(shape),
        "shape_training_flops": model_flops_per_token(shape) * optimal["tokens"],
    }
    if config.gpu is not None:
        result["estimate"] = estimate(FeasibilityConfig(
            model=ModelSource(shape=shape), tokens=optimal["tokens"], gpu=config.gpu, num_gpus=config.num_gpus,
            plan=config.plan, mfu=config.mfu, price_per_gpu_hour=config.price_per_gpu_hour,
            usable_memory_fraction=config.usable_memory_fraction, hardware_catalog=config.hardware_catalog))
    return result


def render_budget_markdown(result: dict[str, Any]) -> str:
    shape = result["shape"]
    lines = [
        f"# What to train with {fmt(result['compute_budget_flops'])} FLOPs",
        "",
        f"Scaling law `{result['scaling_law']}`: {result['law']}.",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| N* (parameters) | {fmt(result['params'])} |",
        f"| D* (tokens) | {fmt(result['tokens'])} |",
        f"| tokens per parameter | {result['tokens_per_param']:.1f} |",
        f"| predicted loss (nats/token, the law's data) | {result['predicted_loss']:.3f} |",
        "",
        f"Suggested dense shape near N* ({result['shape_rule']}):",
        "",
        "| layers | d_model | heads | kv heads | head dim | ffn | vocab | seq | parameters | FLOPs on D* (6N + 12LHQT) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {shape['num_layers']} | {shape['d_model']} | {shape['num_heads']} | {shape['num_kv_heads']} | "
        f"{shape['head_dim']} | {shape['ffn_dim']} | {shape['vocab_size']} | {shape['seq_len']} | "
        f"{fmt(result['shape_params'])} | {fmt(result['shape_training_flops'])} "
        f"({result['shape_training_flops'] / result['compute_budget_flops']:.2f} x budget) |",
        "",
    ]
    if "estimate" in result:
        lines += ["Training this shape on D* tokens:", "", render_markdown(result["estimate"]).split("\n", 2)[2]]
    else:
        lines += ["Give --gpu (and --num-gpus) for time, cost and a memory plan of this shape.", ""]
    return "\n".join(lines)


def run_budget(config: BudgetConfig, dest: str, overwrite: bool = False) -> Manifest:
    """`advise` published as an artifact (estimate.json, estimate.md)."""

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        result = advise(config)
        (out_dir / ESTIMATE_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        (out_dir / REPORT_FILE).write_text(render_budget_markdown(result), encoding="utf-8")
        return {key: result[key] for key in ("params", "tokens", "predicted_loss", "shape_params")}

    inputs = {"hardware_catalog": config.hardware_catalog} if config.hardware_catalog else {}
    return produce(SPEC, config, inputs, dest, build, overwrite=overwrite)
