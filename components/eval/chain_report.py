"""What each stage of a model chain did to a real model: one table from the artifacts it made.

Invariant: every number is read from an input artifact's manifest metrics (written by the
stage that measured it), and the report names each input's URI and content hash; nothing
is recomputed or typed in here. Inputs (all optional but `base_*`, so a partial chain still
reports what it has): greedy accuracy on each task for each model of the chain
(`<model>_<task>`, `verifiable_accuracy` artifacts, with their 95 % Wilson intervals), the
held-out answer loss before and after SFT (`answer_loss`), the GRPO seed study
(`grpo_study`: validation accuracy before/after over seeds) and DPO (held-out implicit-reward
accuracy before/after).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce, read_manifest
from components.config import StrictConfig

SPEC = ComponentSpec(name="chain_report", version="1")
REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
MODELS = ("base", "sft", "grpo", "dpo")
TASKS = ("gsm8k", "arithmetic")


class ChainReportConfig(StrictConfig):
    title: str = Field("Real-model chain", description="The report's heading.")
    model_labels: dict[str, str] = Field(
        {"base": "baseline (imported)", "sft": "after SFT", "grpo": "after GRPO (seed 0)", "dpo": "after DPO"},
        description="Row label of each model of the chain.")


def _metrics(paths: dict[str, Path], name: str) -> dict[str, Any] | None:
    return read_manifest(str(paths[name])).metrics if name in paths else None


def accuracy_cell(metrics: dict[str, Any] | None) -> str:
    """"23.5 % [18.2, 29.7] (n=200)" from a verifiable_accuracy artifact's metrics, "-" without one."""
    if metrics is None:
        return "-"
    return (f"{100 * metrics['greedy_accuracy']:.1f} % [{100 * metrics['greedy_accuracy_ci95_low']:.1f}, "
            f"{100 * metrics['greedy_accuracy_ci95_high']:.1f}] (n={metrics['problems_used']})")


def accuracy_table(config: ChainReportConfig, paths: dict[str, Path]) -> tuple[list[str], dict[str, Any]]:
    lines = ["| model | GSM8K test, greedy [95 % CI] | arithmetic test, greedy [95 % CI] |", "|---|---:|---:|"]
    metrics: dict[str, Any] = {}
    for model in MODELS:
        cells = [_metrics(paths, f"{model}_{task}") for task in TASKS]
        if all(cell is None for cell in cells):
            continue
        lines.append(f"| {config.model_labels.get(model, model)} | " + " | ".join(map(accuracy_cell, cells)) + " |")
        for task, cell in zip(TASKS, cells):
            if cell is not None:
                metrics[f"{model}_{task}_greedy_accuracy"] = cell["greedy_accuracy"]
    return lines, metrics


def training_lines(paths: dict[str, Path]) -> tuple[list[str], dict[str, Any]]:
    """The three proofs that training moved the model, each with its before and after."""
    lines, metrics = [], {}
    before, after = _metrics(paths, "base_answer_loss"), _metrics(paths, "sft_answer_loss")
    if before and after:
        metrics["answer_nll_before"], metrics["answer_nll_after"] = (before["answer_nll_per_token"],
                                                                    after["answer_nll_per_token"])
        lines.append(f"- SFT, held-out answer loss (nats/token, {after['examples']} validation examples): "
                     f"{before['answer_nll_per_token']:.4f} -> {after['answer_nll_per_token']:.4f} "
                     f"(per-example mean 95 % CI after: [{after['example_mean_nll_ci95_low']:.4f}, "
                     f"{after['example_mean_nll_ci95_high']:.4f}])")
    study = _metrics(paths, "grpo_study")
    if study:
        key = "heldout_sampled_accuracy" if "heldout_sampled_accuracy_gain_mean" in study else "heldout_accuracy"
        metrics.update({f"grpo_{key}_{part}": study[f"{key}_{part}"] for part in ("before_mean", "after_mean",
                                                                                  "gain_mean", "gain_std")})
        lines.append(f"- GRPO, validation {key} over {study['seeds']} seeds: {study[f'{key}_before_mean']:.3f} -> "
                     f"{study[f'{key}_after_mean']:.3f}, gain {study[f'{key}_gain_mean']:+.3f} +- "
                     f"{study[f'{key}_gain_std']:.3f} (std over seeds)")
    dpo = _metrics(paths, "dpo")
    if dpo and "heldout_reward_accuracy_after" in dpo:
        metrics["dpo_heldout_reward_accuracy_before"] = dpo["heldout_reward_accuracy_before"]
        metrics["dpo_heldout_reward_accuracy_after"] = dpo["heldout_reward_accuracy_after"]
        lines.append(f"- DPO, held-out implicit-reward accuracy ({dpo['heldout_pairs']} pairs): "
                     f"{dpo['heldout_reward_accuracy_before']:.3f} -> {dpo['heldout_reward_accuracy_after']:.3f}")
    return lines, metrics


def _build(config: ChainReportConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    table, metrics = accuracy_table(config, paths)
    proofs, proof_metrics = training_lines(paths)
    sources = [f"- `{name}`: {read_manifest(str(path)).output.uri} ({read_manifest(str(path)).output.content_hash[:19]})"
               for name, path in sorted(paths.items())]
    lines = [f"# {config.title}", "", *table, "", "Did training move the model?", "", *proofs, "",
             "Inputs:", "", *sources]
    (out_dir / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    metrics.update(proof_metrics)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def chain_report(config: ChainReportConfig, dest: str, overwrite: bool = False, **inputs: str | None) -> Manifest:
    """The chain's table from the artifacts named in `inputs` (see the module doc for the names)."""
    given = {name: uri for name, uri in inputs.items() if uri}
    return produce(SPEC, config, given, dest, lambda out_dir, paths: _build(config, paths, out_dir), overwrite=overwrite)
