"""What every trainer does around the loop: FLOPs per token for MFU, the run's target check
against the feasibility estimate, and the step metrics written as an artifact (jsonl for
machines, csv for `dvc plots`, a markdown summary for people)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from components.runlog import (
    PUBLISHED_STEP_CSV_FILE, PUBLISHED_STEP_LOG_FILE, STEP_LOG_FILE, TRAIN_REPORT_FILE, metrics_table, read_metrics,
    write_csv,
)
from components.train.engine import TrainConfig, TrainResult

CSV_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib", "elapsed_s")


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
    shutil.copyfile(run_dir / STEP_LOG_FILE, out_dir / PUBLISHED_STEP_LOG_FILE)
    write_csv(out_dir / PUBLISHED_STEP_CSV_FILE, read_metrics(out_dir / PUBLISHED_STEP_LOG_FILE), CSV_COLUMNS)
    (out_dir / TRAIN_REPORT_FILE).write_text("\n".join(metrics_table(title, result_metrics)) + "\n", encoding="utf-8")


def summarize(result: TrainResult, run_dir: Path) -> dict[str, Any]:
    """Run metrics over every step (including those before a resume, read from the live log)."""
    records = read_metrics(run_dir / STEP_LOG_FILE)
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
