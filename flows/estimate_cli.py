"""`crucible estimate`: the feasibility estimator from the command line.

With model flags (`--model-config`, the shape flags, or `--params`) it estimates that run
and prints JSON (`--json`) or markdown; `--output` also publishes it as an artifact.
With `--compute-budget` and no model it says what to train with that budget (N*, D*, the
predicted loss, a dense shape near N*, and with `--gpu/--num-gpus` its time, cost and memory
plan). Without either it runs the pipeline's `estimate` stage from the params file.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import ValidationError

from components.config import StrictConfig
from components.errors import ConfigError
from components.feasibility.budget import BudgetConfig, advise, render_budget_markdown, run_budget
from components.feasibility.estimate import FeasibilityConfig, estimate, read_estimate, render_markdown, run_estimate

# config key path -> the flag a user typed, so errors name the flag
FLAGS = {
    "model.config_path": "--model-config", "model.params": "--params", "model.seq_len": "--seq-len",
    "model.shape.num_layers": "--layers", "model.shape.d_model": "--d-model", "model.shape.num_heads": "--heads",
    "model.shape.num_kv_heads": "--kv-heads", "model.shape.ffn_dim": "--ffn", "model.shape.vocab_size": "--vocab",
    "model.shape.seq_len": "--seq-len", "model.shape.mlp": "--mlp", "model.shape": "shape flags", "model": "model flags",
    "tokens": "--tokens", "gpu": "--gpu", "num_gpus": "--num-gpus", "mfu": "--mfu",
    "price_per_gpu_hour": "--price-per-gpu-hour", "compute_budget_flops": "--compute-budget",
    "scaling_law": "--scaling-law", "hardware_catalog": "--hardware-catalog", "sweep_num_gpus": "--sweep",
    "plan.zero_stage": "--zero-stage", "plan.tensor_parallel": "--tp", "plan.pipeline_parallel": "--pp",
    "plan.activation_checkpointing": "--activation-checkpointing", "plan.micro_batch_size": "--micro-batch",
    "plan.gradient_accumulation_steps": "--grad-accum", "plan.precision": "--precision",
    "plan.gpus_per_node": "--gpus-per-node", "plan": "parallelism flags", "": "flags",
    "aspect_ratio": "--aspect-ratio", "vocab_size": "--vocab", "seq_len": "--seq-len",
}
SHAPE_FLAGS = {"layers": "num_layers", "d_model": "d_model", "heads": "num_heads", "kv_heads": "num_kv_heads",
               "ffn": "ffn_dim", "vocab": "vocab_size", "seq_len": "seq_len"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every estimator flag defaults to None: unset flags take FeasibilityConfig's defaults,
    and a flag given where it has no effect is an error rather than silently ignored."""
    model = parser.add_argument_group("model (one of: --model-config, the shape flags, --params)")
    model.add_argument("--model-config", help="transformers config.json, or a directory holding one")
    for flag in SHAPE_FLAGS:
        model.add_argument(f"--{flag.replace('_', '-')}", type=int)
    model.add_argument("--mlp", choices=["swiglu", "gelu"], help="MLP type for the shape flags (default swiglu)")
    model.add_argument("--tie-embeddings", action="store_true", default=None, help="shape flags: shared embeddings")
    model.add_argument("--params", type=float, help="parameter count only (6N FLOPs; memory is not checked)")
    run = parser.add_argument_group("run and hardware")
    run.add_argument("--tokens", type=float, help="training tokens (required)")
    run.add_argument("--gpu", help="accelerator from the catalog, any case or an alias such as h100 (default H100-SXM)")
    run.add_argument("--num-gpus", type=int, help="default 8")
    run.add_argument("--gpus-per-node", type=int, help="default 8")
    run.add_argument("--hardware-catalog", help="YAML file extending the accelerator catalog")
    run.add_argument("--mfu", type=float, help="model FLOPs utilisation (default 0.4)")
    run.add_argument("--price-per-gpu-hour", type=float)
    run.add_argument("--compute-budget", type=float,
                     help="FLOP budget: alone, what to train with it (N*, D*, loss, a shape); with a model, "
                          "adds compute_optimal params/tokens/loss")
    run.add_argument("--scaling-law", choices=["epoch2024", "chinchilla", "tokens_per_param"], help="default epoch2024")
    run.add_argument("--aspect-ratio", type=float,
                     help="--compute-budget without a model: d_model / layers of the suggested shape (default 128)")
    plan = parser.add_argument_group("parallelism")
    plan.add_argument("--zero-stage", type=int, help="default 1")
    plan.add_argument("--offload-optimizer", action="store_true", default=None)
    plan.add_argument("--offload-params", action="store_true", default=None)
    plan.add_argument("--tp", type=int, help="tensor-parallel degree (default 1)")
    plan.add_argument("--pp", type=int, help="pipeline-parallel degree (default 1)")
    plan.add_argument("--sequence-parallel", action="store_true", default=None)
    plan.add_argument("--activation-checkpointing", choices=["none", "selective", "full"])
    plan.add_argument("--micro-batch", type=int, help="default 1")
    plan.add_argument("--grad-accum", type=int, help="default 1")
    plan.add_argument("--precision", choices=["bf16", "fp16", "fp8", "fp32"],
                      help="default bf16; fp8: time at the fp8 peak, needs NVIDIA Transformer Engine (DeepSpeed runs bf16)")
    plan.add_argument("--no-flash-attention", action="store_true", default=None, help="attention that stores s x s scores")
    plan.add_argument("--dropout", action="store_true", default=None)
    plan.add_argument("--autocast", action="store_true", default=None,
                      help="bf16/fp16 by torch.autocast over fp32 weights on one process (crucible's trainer without "
                           "DeepSpeed): fp32 weights and gradients, fp32 norms")
    out = parser.add_argument_group("output")
    out.add_argument("--sweep", help="what-if sweep, e.g. num-gpus=64,128,256")
    out.add_argument("--json", action="store_true", default=None, help="print one JSON object")


RUN_FLAGS = {"tokens": "tokens", "gpu": "gpu", "num_gpus": "num_gpus", "mfu": "mfu",
             "price_per_gpu_hour": "price_per_gpu_hour", "compute_budget": "compute_budget_flops",
             "scaling_law": "scaling_law", "hardware_catalog": "hardware_catalog"}
PLAN_FLAGS = {"zero_stage": "zero_stage", "offload_optimizer": "offload_optimizer", "offload_params": "offload_params",
              "tp": "tensor_parallel", "pp": "pipeline_parallel", "sequence_parallel": "sequence_parallel",
              "activation_checkpointing": "activation_checkpointing", "micro_batch": "micro_batch_size",
              "grad_accum": "gradient_accumulation_steps", "precision": "precision", "dropout": "dropout",
              "gpus_per_node": "gpus_per_node", "autocast": "autocast"}
ADHOC_ONLY = [*SHAPE_FLAGS, "model_config", "params", "mlp", "tie_embeddings", *RUN_FLAGS, *PLAN_FLAGS,
              "no_flash_attention", "sweep", "json", "aspect_ratio"]
# Flags that describe a model; --vocab and --seq-len alone (with --compute-budget) only set
# the suggested shape's vocabulary and sequence length.
MODEL_FLAGS = ("model_config", "params", "layers", "d_model", "heads", "kv_heads", "ffn")
NOT_IN_BUDGET_MODE = {"tokens": "the budget sets the tokens (the law's D*); give a model to estimate chosen tokens",
                      "sweep": "not with --compute-budget alone", "mlp": "only with the shape flags",
                      "tie_embeddings": "only with the shape flags"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _model_given(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in MODEL_FLAGS)


def _budget_only(args: argparse.Namespace) -> bool:
    return args.compute_budget is not None and not _model_given(args)


def wants_adhoc(args: argparse.Namespace) -> bool:
    """Model flags or --compute-budget select the ad-hoc estimator; any other estimator flag
    without them is an error."""
    if _model_given(args) or args.compute_budget is not None:
        if args.tokenizer is not None or args.config is not None:
            raise ConfigError("--config/--tokenizer: only for the pipeline stage (no model flags)")
        return True
    stray = [_flag(name) for name in ADHOC_ONLY if getattr(args, name) is not None]
    if stray:
        raise ConfigError(f"{', '.join(stray)}: need a model (--model-config, the shape flags or --params) or "
                          "--compute-budget; without one `crucible estimate` runs the pipeline stage from the params file")
    return False


def _sweep(text: str | None) -> list[int]:
    if not text:
        return []
    name, _, values = text.partition("=")
    if name != "num-gpus" or not values:
        raise ConfigError(f"--sweep: expected num-gpus=N,N,... (got {text!r})")
    try:
        return [int(v) for v in values.split(",")]
    except ValueError:
        raise ConfigError(f"--sweep: GPU counts must be integers (got {values!r})") from None


def _given(args: argparse.Namespace, mapping: dict[str, str]) -> dict[str, Any]:
    return {key: getattr(args, flag) for flag, key in mapping.items() if getattr(args, flag) is not None}


def _validate(model: type[StrictConfig], data: dict[str, Any]) -> Any:
    """`model` from flag values; errors name the flag a user typed."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            path = ".".join(str(p) for p in item["loc"])
            flag = FLAGS.get(path) or FLAGS.get(path.rsplit(".", 1)[0], path)
            got = f" (got {item['input']!r})" if item["type"] != "missing" and not isinstance(item.get("input"), dict) else ""
            problems.append(f"{flag}: {item['msg'].removeprefix('Value error, ')}{got}")
        raise ConfigError("; ".join(problems)) from None


def _plan(args: argparse.Namespace) -> dict[str, Any]:
    plan = _given(args, PLAN_FLAGS)
    if args.no_flash_attention:
        plan["flash_attention"] = False
    return plan


def budget_config_from_args(args: argparse.Namespace) -> BudgetConfig:
    """--compute-budget without a model: the budget, the suggested shape's rule, and hardware
    when --gpu or --num-gpus is given (H100-SXM when only the count is)."""
    refused = [f"{_flag(name)}: {why}" for name, why in NOT_IN_BUDGET_MODE.items() if getattr(args, name)]
    if refused:
        raise ConfigError("; ".join(refused))
    data = {key: value for key, value in _given(args, RUN_FLAGS).items() if key != "tokens"}
    data.update({key: getattr(args, flag) for flag, key in (("aspect_ratio", "aspect_ratio"), ("vocab", "vocab_size"),
                                                             ("seq_len", "seq_len")) if getattr(args, flag) is not None})
    if args.num_gpus is not None and args.gpu is None:
        data["gpu"] = "H100-SXM"
    hardware_only = [_flag(name) for name in ("mfu", "price_per_gpu_hour", "hardware_catalog", *PLAN_FLAGS,
                                              "no_flash_attention") if getattr(args, name) is not None]
    if "gpu" not in data and hardware_only:
        raise ConfigError(f"{', '.join(hardware_only)}: need --gpu or --num-gpus (time, cost and memory are "
                          "estimated for named hardware)")
    return _validate(BudgetConfig, {**data, "plan": _plan(args)})


def config_from_args(args: argparse.Namespace) -> FeasibilityConfig:
    if args.aspect_ratio is not None:
        raise ConfigError("--aspect-ratio: only with --compute-budget and no model (it shapes the suggested model)")
    shape_given = [flag for flag in SHAPE_FLAGS if flag != "seq_len" and getattr(args, flag) is not None]
    sources = [name for name, on in (("--model-config", args.model_config is not None),
                                     ("--params", args.params is not None), ("shape flags", bool(shape_given))) if on]
    if len(sources) > 1:
        raise ConfigError(f"{' and '.join(sources)}: give exactly one way to describe the model")
    if not shape_given and (args.mlp is not None or args.tie_embeddings):
        raise ConfigError("--mlp/--tie-embeddings: only with the shape flags (a config file says these itself)")
    if args.params is not None and args.seq_len is not None:
        raise ConfigError("--seq-len: has no effect with --params (no attention or activation estimate)")
    if args.model_config is not None:
        model: dict[str, Any] = {"config_path": args.model_config, "seq_len": args.seq_len}
    elif args.params is not None:
        model = {"params": args.params}
    else:
        shape = _given(args, SHAPE_FLAGS)
        shape.update({"mlp": args.mlp or "swiglu", "tie_word_embeddings": bool(args.tie_embeddings)})
        shape.setdefault("num_kv_heads", shape.get("num_heads"))
        model = {"shape": shape}
    if args.tokens is None:
        raise ConfigError("--tokens: required (training tokens)")
    data = {"model": model, **_given(args, RUN_FLAGS), "sweep_num_gpus": _sweep(args.sweep), "plan": _plan(args)}
    return _validate(FeasibilityConfig, data)


def run_adhoc(args: argparse.Namespace) -> None:
    if _budget_only(args):
        budget = budget_config_from_args(args)
        result = read_estimate(run_budget(budget, args.output, args.overwrite)) if args.output else advise(budget)
        print(json.dumps(result, indent=2) if args.json else render_budget_markdown(result))
        return
    config = config_from_args(args)
    result = read_estimate(run_estimate(config, args.output, args.overwrite)) if args.output else estimate(config)
    print(json.dumps(result, indent=2) if args.json else render_markdown(result))
