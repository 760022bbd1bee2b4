"""The estimator: can this model be trained on these tokens with this hardware, how long,
at what cost, and with which DeepSpeed plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from components.artifacts import ComponentSpec, Manifest, materialize, produce
from components.config import StrictConfig
from components.errors import ConfigError
from components.feasibility import flops as flops_lib
from components.feasibility.hardware import Accelerator, load_catalog, resolve_name
from components.feasibility.memory import (
    GIB, activation_bytes_per_layer, model_state_bytes, output_layer_bytes,
)
from components.feasibility.plan import ParallelPlan, deepspeed_config, describe, search_plan
from components.feasibility.scaling import ScalingLaw, compute_optimal
from components.feasibility.shapes import ModelShape, shape_from_hf_config

SPEC = ComponentSpec(name="estimate", version="2")  # 2: no memory verdict without a shape
ESTIMATE_FILE = "estimate.json"
REPORT_FILE = "estimate.md"
SWEEP_PNG = "sweep.png"
SECONDS_PER_DAY = 86_400.0


class ModelSource(StrictConfig):
    """Exactly one of: a transformers config, an explicit shape, or a parameter count."""

    config_path: str | None = Field(None, description="transformers config.json (or a directory holding one).")
    shape: ModelShape | None = None
    params: float | None = Field(None, gt=0, description="Parameter count only: 6N FLOPs; memory is not checked.")
    seq_len: int | None = Field(None, gt=0, description="Sequence length for config_path (default: its context).")

    @model_validator(mode="after")
    def _exactly_one(self) -> "ModelSource":
        given = [name for name in ("config_path", "shape", "params") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of --model-config, the shape flags, or --params (got {given or 'none'})")
        return self


class FeasibilityConfig(StrictConfig):
    model: ModelSource
    tokens: float = Field(gt=0, description="Training tokens.")
    gpu: str = Field("H100-SXM", description="Accelerator from the catalog: its name in any case, or an alias (h100).")
    num_gpus: int = Field(8, ge=1)
    plan: ParallelPlan = ParallelPlan()
    mfu: float = Field(0.4, gt=0, le=1, description="Model FLOPs utilisation assumed for time and cost.")
    price_per_gpu_hour: float | None = Field(None, ge=0, description="USD per GPU-hour.")
    compute_budget_flops: float | None = Field(None, gt=0, description="FLOP budget for compute-optimal sizing.")
    scaling_law: ScalingLaw = "epoch2024"
    usable_memory_fraction: float = Field(
        0.9, gt=0, le=1, description="Share of device memory a run may plan for (CUDA context, fragmentation)."
    )
    hardware_catalog: str | None = Field(None, description="YAML file extending the accelerator catalog.")
    sweep_num_gpus: list[int] = Field(default_factory=list, description="What-if GPU counts.")

    @model_validator(mode="after")
    def _degrees_divide(self) -> "FeasibilityConfig":
        model_parallel = self.plan.tensor_parallel * self.plan.pipeline_parallel
        for gpus in [self.num_gpus, *self.sweep_num_gpus]:
            if gpus < 1 or gpus % model_parallel:
                raise ValueError(f"--num-gpus ({gpus}) must be a positive multiple of tensor x pipeline parallel ({model_parallel})")
        return self


def resolve_model(source: ModelSource) -> tuple[ModelShape | None, int]:
    if source.config_path is not None:
        return shape_from_hf_config(source.config_path, source.seq_len)
    if source.shape is not None:
        return source.shape, source.shape.parameter_count()
    return None, int(source.params)


def _memory(shape: ModelShape | None, params: int, plan: ParallelPlan, gpus: int) -> dict[str, float | None]:
    """GiB per GPU. Without a shape only the model states are known, as a lower bound (no
    activations, no ZeRO-3 gathered layer): `activations` and `total` are None."""
    model_parallel = plan.tensor_parallel * plan.pipeline_parallel
    data_parallel = gpus // model_parallel
    largest = shape.largest_layer_parameters() / plan.tensor_parallel if shape else 0.0
    states = model_state_bytes(
        params / model_parallel, largest, plan.zero_stage, data_parallel, min(plan.gpus_per_node, gpus),
        -(-gpus // plan.gpus_per_node), plan.mixed_precision, plan.offload_optimizer, plan.offload_params,
        autocast=plan.autocast,
    )
    activations = None
    if shape is not None:
        per_layer = activation_bytes_per_layer(
            shape, plan.micro_batch_size, plan.activation_bytes, plan.activation_checkpointing,
            plan.tensor_parallel, plan.sequence_parallel, plan.dropout, plan.flash_attention, plan.autocast,
        )
        activations = shape.num_layers * per_layer + output_layer_bytes(
            shape, plan.micro_batch_size, plan.activation_bytes, plan.tensor_parallel)
    return {
        "weights": states.weights / GIB,
        "gradients": states.gradients / GIB,
        "optimizer_states": states.optimizer_states / GIB,
        "activations": None if activations is None else activations / GIB,
        "total": None if activations is None else (states.total + activations) / GIB,
        "cpu_per_node": states.cpu_per_node / GIB,
    }


def gpu_hours_for(training_flops: float, mfu: float, peak_flops_per_s: float) -> float:
    """GPU-hours = FLOPs / (MFU x peak FLOP/s) / 3600: MFU is model FLOPs over peak (PaLM, Sec. 4.1)."""
    return training_flops / (mfu * peak_flops_per_s) / 3600.0


def _time_and_cost(config: FeasibilityConfig, training_flops: float, device: Accelerator, gpus: int,
                   precision: str | None = None) -> dict[str, Any]:
    gpu_hours = gpu_hours_for(training_flops, config.mfu, device.peak_flops_per_s(precision or config.plan.precision))
    return {
        "gpu_hours": gpu_hours,
        "wall_clock_days": gpu_hours * 3600 / gpus / SECONDS_PER_DAY,
        "cost_usd": gpu_hours * config.price_per_gpu_hour if config.price_per_gpu_hour is not None else None,
    }


NO_SHAPE = ("--params gives no shape, and activations and the largest layer need one; give --model-config or the "
            "shape flags (--layers --d-model --heads --ffn --vocab --seq-len)")
MEMORY_NOT_CHECKED = f"memory not checked: {NO_SHAPE}"
FP8_ENGINE = "NVIDIA Transformer Engine"
FP8_NOTE = (f"fp8: the time assumes the matmuls run in fp8 at the device's fp8 peak, which needs an fp8 engine "
            f"({FP8_ENGINE}: te.Linear layers under te.fp8_autocast). DeepSpeed has no fp8 mode: the DeepSpeed "
            "config trains in bf16 mixed precision (what the memory plan counts) and the engine supplies the fp8 "
            "matmuls; without it the run takes the bf16 time (bf16_gpu_hours).")


def _recommendation(shape: ModelShape | None, params: int, plan: ParallelPlan, gpus: int,
                    limit_gib: float) -> tuple[dict[str, Any], ParallelPlan, int]:
    """The verdict and the plan to run: none without a shape, else the cheapest plan that fits."""
    if shape is None:
        return {"fits": None, "changes": [], "summary": MEMORY_NOT_CHECKED}, plan, gpus

    def fits(candidate: ParallelPlan, candidate_gpus: int) -> bool:
        return _memory(shape, params, candidate, candidate_gpus)["total"] <= limit_gib

    found = search_plan(plan, gpus, fits)
    if found is None:
        return ({"fits": False, "changes": [],
                 "summary": "no plan within 64x the GPUs fits; use a smaller model or larger devices"}, plan, gpus)
    changes, chosen_plan, chosen_gpus = found
    return {
        "fits": True,
        "changes": changes,
        "summary": "fits as configured" if not changes else f"change to {describe(chosen_plan, chosen_gpus)}",
        "plan": chosen_plan.model_dump(mode="json"),
        "num_gpus": chosen_gpus,
        "memory_per_gpu_gib": _memory(shape, params, chosen_plan, chosen_gpus)["total"],
    }, chosen_plan, chosen_gpus


def _sweep(config: FeasibilityConfig, shape: ModelShape | None, params: int, training_flops: float,
           device: Accelerator, limit_gib: float) -> list[dict[str, Any]]:
    rows = []
    for gpus in config.sweep_num_gpus:
        total = _memory(shape, params, config.plan, gpus)["total"]
        rows.append({"num_gpus": gpus, **_time_and_cost(config, training_flops, device, gpus),
                     "memory_per_gpu_gib": total, "fits": None if total is None else total <= limit_gib})
    return rows


def estimate(config: FeasibilityConfig) -> dict[str, Any]:
    """Everything `crucible estimate --json` prints (pure; no files written)."""
    catalog = load_catalog(config.hardware_catalog)
    gpu = resolve_name(catalog, config.gpu)
    device = catalog[gpu]
    shape, params = resolve_model(config.model)
    plan = config.plan
    if shape is not None:
        flops_per_token = flops_lib.model_flops_per_token(shape)
        hardware_flops = flops_lib.hardware_flops_per_token(shape, plan.activation_checkpointing)
    else:  # parameter count only: Kaplan et al. 2020's 6N
        flops_per_token = hardware_flops = 6.0 * params
    training_flops = flops_per_token * config.tokens
    limit_gib = device.memory_gib * config.usable_memory_fraction
    memory = _memory(shape, params, plan, config.num_gpus)
    recommendation, chosen_plan, chosen_gpus = _recommendation(shape, params, plan, config.num_gpus, limit_gib)
    data_parallel = chosen_gpus // (chosen_plan.tensor_parallel * chosen_plan.pipeline_parallel)
    result: dict[str, Any] = {
        "params": params,
        "flops_per_token": flops_per_token,
        "hardware_flops_per_token": hardware_flops,
        "training_flops": training_flops,
        "tokens": config.tokens,
        "gpu": gpu,
        **({"gpu_note": f"--gpu {config.gpu!r} read as {gpu}"} if gpu != config.gpu else {}),
        "num_gpus": config.num_gpus,
        "interconnect_gb_per_s": device.interconnect_gb_per_s,
        "precision": plan.precision,
        "mfu": config.mfu,
        "hfu": config.mfu * hardware_flops / flops_per_token,
        "tokens_per_s_per_gpu": config.mfu * device.peak_flops_per_s(plan.precision) / flops_per_token,
        **_time_and_cost(config, training_flops, device, config.num_gpus),
        "memory_per_gpu_gib": {k: v for k, v in memory.items() if k != "cpu_per_node"},
        "cpu_memory_per_node_gib": memory["cpu_per_node"],
        "memory_limit_gib": limit_gib,
        "memory_checked": shape is not None,
        "fits": None if memory["total"] is None else memory["total"] <= limit_gib,
        "activations_estimated": shape is not None,
        "recommendation": recommendation,
        "deepspeed_config": deepspeed_config(chosen_plan, data_parallel),
        "global_batch_tokens": (shape.seq_len * chosen_plan.micro_batch_size * chosen_plan.gradient_accumulation_steps
                                * data_parallel if shape else None),
    }
    if plan.precision == "fp8":
        result["precision_note"] = FP8_NOTE
        result["bf16_gpu_hours"] = _time_and_cost(config, training_flops, device, config.num_gpus, "bf16")["gpu_hours"]
    if config.compute_budget_flops is not None:
        result["compute_optimal"] = {**compute_optimal(config.compute_budget_flops, config.scaling_law),
                                     "scaling_law": config.scaling_law}
    if config.sweep_num_gpus:
        result["sweep"] = _sweep(config, shape, params, training_flops, device, limit_gib)
    return result


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:,.3g}{unit}" if abs(value) < 1e4 else f"{value:.3e}{unit}"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _verdict_lines(result: dict[str, Any]) -> list[str]:
    if result["fits"] is None:
        return [f"**Memory not checked, no verdict:** {NO_SHAPE}. The model states above are a lower bound (no "
                "activations, no ZeRO-3 gathered layer)."]
    recommendation = result["recommendation"]
    needs = (f" ({recommendation['memory_per_gpu_gib']:.2f} GiB per GPU)"
             if recommendation["fits"] and recommendation["changes"] else "")
    lines = [f"**Fits as configured: {'yes' if result['fits'] else 'no'}.** "
             f"Recommendation: {recommendation['summary']}{needs}."]
    return lines + [f"- {change}" for change in recommendation["changes"]]


def render_markdown(result: dict[str, Any]) -> str:
    memory = result["memory_per_gpu_gib"]
    lines = [
        "# Feasibility estimate",
        "",
        *([f"{result['gpu_note']}.", ""] if "gpu_note" in result else []),
        "| quantity | value |",
        "|---|---:|",
        f"| parameters | {result['params']:,} |",
        f"| model FLOPs per token ({'6N + 12LHQT' if result['activations_estimated'] else '6N'}) | "
        f"{fmt(result['flops_per_token'])} |",
        f"| training FLOPs | {fmt(result['training_flops'])} |",
        f"| GPUs | {result['num_gpus']} x {result['gpu']} ({result['precision']}) |",
        f"| MFU (assumed) / HFU | {result['mfu']:.2f} / {result['hfu']:.2f} |",
        f"| GPU-hours | {fmt(result['gpu_hours'])} |",
        f"| wall clock | {fmt(result['wall_clock_days'], ' days')} |",
        f"| cost | {fmt(result['cost_usd'], ' USD')} |",
        "",
        "| memory per GPU (GiB) | weights | gradients | optimizer states | activations | total | limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
        f"| | {memory['weights']:.2f} | {memory['gradients']:.2f} | {memory['optimizer_states']:.2f} | "
        f"{_gib(memory['activations'])} | {_gib(memory['total'])} | {result['memory_limit_gib']:.1f} |",
        "",
        *_verdict_lines(result),
    ]
    if "precision_note" in result:
        lines += ["", f"{result['precision_note']} bf16 time: {fmt(result['bf16_gpu_hours'])} GPU-hours."]
    if "compute_optimal" in result:
        optimal = result["compute_optimal"]
        lines += ["", f"Compute-optimal ({optimal['scaling_law']}): {fmt(optimal['params'])} parameters on "
                      f"{fmt(optimal['tokens'])} tokens, predicted loss {optimal['predicted_loss']:.3f}."]
    if "sweep" in result:
        lines += ["", "| GPUs | days | GPU-hours | cost (USD) | memory/GPU (GiB) | fits |", "|---:|---:|---:|---:|---:|:--:|"]
        lines += [f"| {r['num_gpus']} | {fmt(r['wall_clock_days'])} | {fmt(r['gpu_hours'])} | {fmt(r['cost_usd'])} | "
                  f"{_gib(r['memory_per_gpu_gib'])} | {_yes_no(r['fits'])} |" for r in result["sweep"]]
    lines += ["", "DeepSpeed config:", "", "```json", json.dumps(result["deepspeed_config"], indent=2), "```", ""]
    return "\n".join(lines)


def _yes_no(value: bool | None) -> str:
    return "not checked" if value is None else ("yes" if value else "no")


def plot_sweep(sweep: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gpus = [row["num_gpus"] for row in sweep]
    figure, days_axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    days_axis.plot(gpus, [row["wall_clock_days"] for row in sweep], "o-", color="tab:blue")
    days_axis.set_xscale("log", base=2)
    days_axis.set_xlabel("GPUs")
    days_axis.set_ylabel("wall clock (days)", color="tab:blue")
    if all(row["cost_usd"] is not None for row in sweep):
        cost_axis = days_axis.twinx()
        cost_axis.plot(gpus, [row["cost_usd"] for row in sweep], "s--", color="tab:red")
        cost_axis.set_ylabel("cost (USD)", color="tab:red")
    days_axis.set_title("What-if: number of GPUs")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_estimate(result: dict[str, Any], out_dir: Path) -> None:
    (out_dir / ESTIMATE_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out_dir / REPORT_FILE).write_text(render_markdown(result), encoding="utf-8")
    if "sweep" in result:
        plot_sweep(result["sweep"], out_dir / SWEEP_PNG)


def summary_metrics(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result[key] for key in ("params", "flops_per_token", "training_flops", "gpu_hours",
                                         "wall_clock_days", "cost_usd", "fits")} | {
        "memory_per_gpu_gib": result["memory_per_gpu_gib"]["total"]}


def file_inputs(config: FeasibilityConfig) -> dict[str, str]:
    """Files the estimate reads, recorded (and hashed) as raw inputs: editing them changes it."""
    inputs = {}
    if config.model.config_path:
        path = Path(config.model.config_path)
        inputs["model_config"] = str(path / "config.json" if path.is_dir() else path)
    if config.hardware_catalog:
        inputs["hardware_catalog"] = config.hardware_catalog
    return inputs


def run_estimate(config: FeasibilityConfig, dest: str, overwrite: bool = False) -> Manifest:
    """Estimate and publish `estimate.json`, `estimate.md` (and `sweep.png`) as an artifact."""

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        result = estimate(config)
        write_estimate(result, out_dir)
        return summary_metrics(result)

    return produce(SPEC, config, file_inputs(config), dest, build, overwrite=overwrite)


def read_estimate(manifest: Manifest) -> dict[str, Any]:
    """The estimate.json of a published estimate artifact."""
    return json.loads((materialize(manifest.output) / ESTIMATE_FILE).read_text(encoding="utf-8"))


class NotFeasibleError(ConfigError):
    """A training run that does not fit the configured devices."""
