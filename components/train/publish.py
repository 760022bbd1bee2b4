"""What a trainer publishes: the model directory (`ModelSaver`, the `save_model` every training
loop calls for checkpoints and the final model), the step metrics (jsonl for machines, csv for
`dvc plots`, a markdown summary for people) and the run's summary metrics."""

from __future__ import annotations

import copy
import shutil
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path
from typing import Any

from components.runlog import (
    PUBLISHED_STEP_CSV_FILE, PUBLISHED_STEP_LOG_FILE, STEP_LOG_FILE, TRAIN_REPORT_FILE, metrics_table, read_metrics,
    write_csv,
)
from components.train.engine import TrainResult

ADAPTER_DIR = "adapter"  # a LoRA run's adapter, beside the merged model
CSV_COLUMNS = ("step", "loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib", "elapsed_s")


@dataclass(frozen=True)
class ModelSaver:
    """`save_model(module, directory)` for a training loop. In order: the transformers model at
    attribute `model` of the module ("model": a loss module's, "policy": PPO's, "": the module
    itself, None: none, as for the frozen model under a soft prompt) with `save_pretrained`,
    or, with `lora` (the PeftModel), its adapter in `adapter/` and then the merged model; the
    tokenizer; `module.soft_prompt` (safetensors, tensor "soft_prompt"); the state dict of
    `module.value_head` (torch.save)."""

    tokenizer: Any = None
    model: str | None = "model"
    lora: Any = None
    soft_prompt_file: str | None = None
    value_head_file: str | None = None

    def __call__(self, module: Any, directory: Path) -> None:
        if self.lora is not None:
            self.lora.save_pretrained(directory / ADAPTER_DIR)
            copy.deepcopy(self.lora).merge_and_unload().save_pretrained(directory)
        elif self.model is not None:
            (attrgetter(self.model)(module) if self.model else module).save_pretrained(directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        if self.soft_prompt_file is not None:
            from safetensors.torch import save_file

            save_file({"soft_prompt": module.soft_prompt.detach().cpu().contiguous()},
                      str(directory / self.soft_prompt_file))
        if self.value_head_file is not None:
            import torch

            torch.save(module.value_head.state_dict(), directory / self.value_head_file)


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
        "precision": result.precision, "precision_reason": result.precision_reason,
    }
