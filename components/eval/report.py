"""The pipeline's report: markdown, a flat metrics.json, and the training loss curve
(CSV for DVC plots, PNG for people)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce, read_manifest
from components.config import StrictConfig
from components.eval.perplexity import METRICS_FILE as EVAL_METRICS_FILE
from components.runlog import PUBLISHED_STEP_LOG_FILE, read_metrics

SPEC = ComponentSpec(name="report", version="1")
REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
LOSS_CSV = "loss_curve.csv"
LOSS_PNG = "loss_curve.png"


class ReportConfig(StrictConfig):
    title: str = "Crucible pipeline report"
    smoothing_steps: int = Field(10, ge=1, description="Window of the moving average drawn over the loss.")


def _moving_average(values: list[float], window: int) -> list[float]:
    out, running = [], 0.0
    for index, value in enumerate(values):
        running += value
        if index >= window:
            running -= values[index - window]
        out.append(running / min(index + 1, window))
    return out


def _plot(steps: list[int], losses: list[float], smoothed: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=120)
    axis.plot(steps, losses, alpha=0.3, label="loss")
    axis.plot(steps, smoothed, label="moving average")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (nats/token)")
    axis.set_title(title)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _build(config: ReportConfig, evaluation: Path, model: Path, out_dir: Path) -> dict[str, Any]:
    eval_metrics = json.loads((evaluation / EVAL_METRICS_FILE).read_text(encoding="utf-8"))
    train_metrics = read_manifest(str(model)).metrics
    records = read_metrics(model / PUBLISHED_STEP_LOG_FILE)
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    smoothed = _moving_average(losses, config.smoothing_steps)
    with open(out_dir / LOSS_CSV, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "loss_smoothed"])
        writer.writerows(zip(steps, losses, smoothed))
    _plot(steps, losses, smoothed, out_dir / LOSS_PNG, config.title)

    ppl = eval_metrics["perplexity"]
    metrics = {
        "heldout_perplexity": ppl,
        "uniform_perplexity": eval_metrics["uniform_perplexity"],
        "unigram_perplexity": eval_metrics["unigram_perplexity"],
        "uniform_over_model": eval_metrics["uniform_perplexity"] / ppl,
        "unigram_over_model": eval_metrics["unigram_perplexity"] / ppl,
        "heldout_tokens": eval_metrics["tokens"],
        "model_params": train_metrics["params"],
        "tokens_trained": train_metrics["tokens_trained"],
        "final_train_loss": train_metrics["final_loss"],
        "train_time_s": train_metrics["train_time_s"],
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out_dir / REPORT_FILE).write_text(render_markdown(config.title, metrics), encoding="utf-8")
    return metrics


def render_markdown(title: str, metrics: dict[str, Any]) -> str:
    return "\n".join([
        f"# {title}",
        "",
        "| held-out perplexity (GSM8K test) | value | model is better by |",
        "|---|---:|---:|",
        f"| trained model | {metrics['heldout_perplexity']:.2f} | |",
        f"| unigram baseline (add-one, training counts) | {metrics['unigram_perplexity']:.2f} | {metrics['unigram_over_model']:.1f}x |",
        f"| uniform baseline (vocabulary size) | {metrics['uniform_perplexity']:.0f} | {metrics['uniform_over_model']:.1f}x |",
        "",
        f"Scored on {metrics['heldout_tokens']:,} held-out tokens. The model has {metrics['model_params']:,} parameters, "
        f"trained on {metrics['tokens_trained']:,} tokens in {metrics['train_time_s']:.0f} s "
        f"(final training loss {metrics['final_train_loss']:.3f}).",
        "",
        f"![training loss]({LOSS_PNG})",
        "",
    ])


def report(config: ReportConfig, evaluation: str, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Summarise an evaluation artifact and the training run of the model it evaluated."""
    return produce(
        SPEC, config, {"evaluation": evaluation, "model": model}, dest,
        lambda out_dir, paths: _build(config, paths["evaluation"], paths["model"], out_dir),
        overwrite=overwrite,
    )
