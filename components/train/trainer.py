"""What every trainer does around the loop: FLOPs per token for MFU, the run's target check
against the feasibility estimate, and the step metrics written as an artifact (jsonl for
machines, csv for `dvc plots`, a markdown summary for people)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.train.engine import METRICS_FILE, TrainConfig, TrainResult, read_metrics

if TYPE_CHECKING:
    from transformers import PreTrainedModel

METRICS_CSV = "train_metrics.csv"
METRICS_JSONL = "train_metrics.jsonl"
SUMMARY_FILE = "train_report.md"
CSV_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib", "elapsed_s")


def training_flops_per_token(model: PreTrainedModel, seq_len_tokens: int) -> float:
    """The feasibility estimator's training FLOPs per token, 6N + 12·L·H·Q·T (PaLM, App. B),
    for the shape of `model` (checked against its parameter count)."""
    from components.feasibility.flops import model_flops_per_token
    from components.feasibility.shapes import check_parameter_count, shape_of_config

    shape = shape_of_config(model.config, seq_len=seq_len_tokens)
    check_parameter_count(shape, sum(p.numel() for p in model.parameters()), model.config.model_type)
    return model_flops_per_token(shape)


def world_size_of(config: TrainConfig, estimate: dict[str, Any] | None) -> int:
    """Ranks the run will have: 1 in-process, else num_procs, else the estimate's num_gpus."""
    if config.distributed.launcher == "none":
        return 1
    return config.distributed.num_procs or (estimate or {}).get("num_gpus", 1)


def zero_stage_of(config: TrainConfig, estimate: dict[str, Any] | None) -> int:
    if config.distributed.launcher == "none":
        return 0
    ds = config.distributed.deepspeed_config or (estimate or {}).get("deepspeed_config") or {}
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def publish_metrics(run_dir: Path, out_dir: Path, title: str, result_metrics: dict[str, Any]) -> None:
    """Copy the run's step records into the artifact as jsonl and csv, and a markdown summary."""
    shutil.copyfile(run_dir / METRICS_FILE, out_dir / METRICS_JSONL)
    records = read_metrics(out_dir / METRICS_JSONL)
    with open(out_dir / METRICS_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
              for key, value in result_metrics.items()]
    (out_dir / SUMMARY_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def summarize(result: TrainResult, run_dir: Path) -> dict[str, Any]:
    """Run metrics over every step (including those before a resume, read from the live log)."""
    records = read_metrics(run_dir / METRICS_FILE)
    tail = records[-min(10, len(records)):]
    train_time_s = sum(r["step_time_s"] for r in records)
    tokens = sum(r["tokens"] for r in records)
    mfus = [r["mfu"] for r in records if r["mfu"] is not None]
    return {
        "steps": len(records),
        "resumed_from_step": result.resumed_from_step,
        "tokens_trained": tokens,
        "loss_tokens_trained": sum(r["loss_tokens"] for r in records),
        "final_loss": sum(r["loss"] for r in tail) / len(tail),
        "train_time_s": round(train_time_s, 2),
        "tokens_per_s": round(tokens / train_time_s, 1),
        "mfu": round(sum(mfus) / len(mfus), 5) if mfus else None,
        "peak_memory_gib": round(max(r["peak_memory_gib"] for r in records), 3),
        "world_size": result.world_size,
        "backend": result.backend,
        "precision": result.precision,
    }
