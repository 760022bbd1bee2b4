"""`crucible estimate`: the feasibility estimator from the command line.

With model flags (`--model-config`, the shape flags, or `--params`) it estimates that run
and prints JSON (`--json`) or markdown; `--output` also publishes it as an artifact.
Without them it runs the pipeline's `estimate` stage from the params file.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from pydantic import ValidationError

from components.errors import ConfigError
from components.feasibility.estimate import FeasibilityConfig, estimate, render_markdown, run_estimate

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
}
SHAPE_FLAGS = {"layers": "num_layers", "d_model": "d_model", "heads": "num_heads", "kv_heads": "num_kv_heads",
               "ffn": "ffn_dim", "vocab": "vocab_size", "seq_len": "seq_len"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model (one of: --model-config, the shape flags, --params)")
    model.add_argument("--model-config", help="transformers config.json, or a directory holding one")
    for flag in SHAPE_FLAGS:
        model.add_argument(f"--{flag.replace('_', '-')}", type=int)
    model.add_argument("--mlp", choices=["swiglu", "gelu"], default=None, help="MLP type for shape flags (default swiglu)")
    model.add_argument("--tie-embeddings", action="store_true", help="input and output embeddings shared")
    model.add_argument("--params", type=float, help="parameter count only (6N FLOPs; no activation estimate)")
    run = parser.add_argument_group("run and hardware")
    run.add_argument("--tokens", type=float, help="training tokens")
    run.add_argument("--gpu", default="H100-SXM", help="accelerator name (see the catalog; default %(default)s)")
    run.add_argument("--num-gpus", type=int, default=8)
    run.add_argument("--gpus-per-node", type=int, default=8)
    run.add_argument("--hardware-catalog", help="YAML file extending the accelerator catalog")
    run.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (default %(default)s)")
    run.add_argument("--price-per-gpu-hour", type=float)
    run.add_argument("--compute-budget", type=float, help="FLOP budget: adds compute_optimal params/tokens/loss")
    run.add_argument("--scaling-law", choices=["epoch2024", "chinchilla", "tokens_per_param"], default="epoch2024")
    plan = parser.add_argument_group("parallelism")
    plan.add_argument("--zero-stage", type=int, default=1)
    plan.add_argument("--offload-optimizer", action="store_true")
    plan.add_argument("--offload-params", action="store_true")
    plan.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    plan.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    plan.add_argument("--sequence-parallel", action="store_true")
    plan.add_argument("--activation-checkpointing", choices=["none", "selective", "full"], default="none")
    plan.add_argument("--micro-batch", type=int, default=1)
    plan.add_argument("--grad-accum", type=int, default=1)
    plan.add_argument("--precision", choices=["bf16", "fp16", "fp8", "fp32"], default="bf16")
    plan.add_argument("--no-flash-attention", action="store_true", help="attention that stores s x s scores")
    plan.add_argument("--dropout", action="store_true")
    out = parser.add_argument_group("output")
    out.add_argument("--sweep", help="what-if sweep, e.g. num-gpus=64,128,256")
    out.add_argument("--json", action="store_true", help="print one JSON object")


def wants_adhoc(args: argparse.Namespace) -> bool:
    return any(getattr(args, name) is not None for name in ("model_config", "params", *SHAPE_FLAGS))


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


def config_from_args(args: argparse.Namespace) -> FeasibilityConfig:
    model: dict[str, Any] = {}
    if args.model_config is not None:
        model = {"config_path": args.model_config, "seq_len": args.seq_len}
    elif args.params is not None:
        model = {"params": args.params}
    if any(getattr(args, f) is not None for f in SHAPE_FLAGS if f != "seq_len") or (not model and args.seq_len):
        model["shape"] = {key: getattr(args, flag) for flag, key in SHAPE_FLAGS.items() if getattr(args, flag) is not None}
        model["shape"].update({"mlp": args.mlp or "swiglu", "tie_word_embeddings": args.tie_embeddings})
        model["shape"].setdefault("num_kv_heads", model["shape"].get("num_heads"))
    if args.tokens is None:
        raise ConfigError("--tokens: required (training tokens)")
    data = {
        "model": model, "tokens": args.tokens, "gpu": args.gpu, "num_gpus": args.num_gpus, "mfu": args.mfu,
        "price_per_gpu_hour": args.price_per_gpu_hour, "compute_budget_flops": args.compute_budget,
        "scaling_law": args.scaling_law, "hardware_catalog": args.hardware_catalog, "sweep_num_gpus": _sweep(args.sweep),
        "plan": {
            "zero_stage": args.zero_stage, "offload_optimizer": args.offload_optimizer, "offload_params": args.offload_params,
            "tensor_parallel": args.tp, "pipeline_parallel": args.pp, "sequence_parallel": args.sequence_parallel,
            "activation_checkpointing": args.activation_checkpointing, "micro_batch_size": args.micro_batch,
            "gradient_accumulation_steps": args.grad_accum, "precision": args.precision,
            "flash_attention": not args.no_flash_attention, "dropout": args.dropout, "gpus_per_node": args.gpus_per_node,
        },
    }
    try:
        return FeasibilityConfig.model_validate(data)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            path = ".".join(str(p) for p in item["loc"])
            flag = FLAGS.get(path) or FLAGS.get(path.rsplit(".", 1)[0], path)
            got = f" (got {item['input']!r})" if item["type"] != "missing" and not isinstance(item.get("input"), dict) else ""
            problems.append(f"{flag}: {item['msg'].removeprefix('Value error, ')}{got}")
        raise ConfigError("; ".join(problems)) from None


def run_adhoc(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    result = estimate(config)
    if args.output:
        run_estimate(config, args.output, overwrite=args.overwrite)
    print(json.dumps(result, indent=2) if args.json else render_markdown(result))
