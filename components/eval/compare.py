"""When does RL beat best-of-n? Accuracy against total compute per query.

Best-of-n pays at inference what RL pays in training (seed post "Scaling Test Time Compute /
RLVR"). This component reads verifiable-accuracy evaluations (`components.eval.accuracy`):
the SFT model's curve (best-of-n, majority vote, calculator, self-reflection at several n)
and, when given, an RL-trained model's. The RL model's training FLOPs (from its manifest
metrics, `training_flops`) are amortised over `queries` queries: its cost per query is its
inference FLOPs plus training FLOPs / queries. The table says, for each query volume, which
method reaches the highest accuracy within each compute budget.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce, read_manifest
from components.config import StrictConfig
from components.eval.accuracy import CURVE_FILE

SPEC = ComponentSpec(name="compare_test_time_compute", version="1")
REPORT_FILE = "report.md"
PLOT_FILE = "accuracy_vs_compute.png"
TABLE_FILE = "accuracy_vs_compute.csv"
METRICS_FILE = "metrics.json"


class CompareConfig(StrictConfig):
    query_volumes: list[int] = Field([100, 10_000, 1_000_000], min_length=1,
                                     description="Queries the RL model's training compute is amortised over.")


def _read_curve(evaluation: Path, label: str, extra_flops_per_query: float = 0.0) -> list[dict[str, Any]]:
    with open(evaluation / CURVE_FILE, encoding="utf-8") as handle:
        return [{"model": label, "method": row["method"], "n": int(row["n"]), "accuracy": float(row["accuracy"]),
                 "flops_per_query": float(row["inference_flops"]) + extra_flops_per_query}
                for row in csv.DictReader(handle)]


def _best_within(points: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    affordable = [p for p in points if p["flops_per_query"] <= budget]
    return max(affordable, key=lambda p: (p["accuracy"], -p["flops_per_query"])) if affordable else None


def _build(config: CompareConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft_points = _read_curve(paths["evaluation"], "sft")
    rl_training_flops = None
    if "rl_evaluation" in paths:
        rl_model = read_manifest(str(paths["rl_evaluation"])).inputs["model"].uri
        rl_training_flops = float(read_manifest(rl_model).metrics.get("training_flops", 0.0))
    rows, lines = [], []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    methods = sorted({p["method"] for p in sft_points})
    for method in methods:
        curve = sorted((p for p in sft_points if p["method"] == method), key=lambda p: p["flops_per_query"])
        axis.plot([p["flops_per_query"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=f"SFT {method}")
    rows += sft_points
    verdicts = []
    for volume in (config.query_volumes if rl_training_flops is not None else [0]):
        points = list(sft_points)
        if rl_training_flops is not None:
            rl_points = _read_curve(paths["rl_evaluation"], f"rl (amortised over {volume:,} queries)",
                                    rl_training_flops / volume)
            points += rl_points
            rows += rl_points
            curve = sorted((p for p in rl_points if p["method"] == "oracle"), key=lambda p: p["flops_per_query"])
            axis.plot([p["flops_per_query"] for p in curve], [p["accuracy"] for p in curve], marker="s",
                      linestyle="--", label=f"RL, {volume:,} queries")
        budgets = sorted({p["flops_per_query"] for p in points})
        for budget in budgets:
            best = _best_within(points, budget)
            verdicts.append({"queries": volume, "budget_flops": budget, "winner": f"{best['model']} {best['method']}@{best['n']}",
                             "accuracy": best["accuracy"]})
    axis.set_xscale("log")
    axis.set_xlabel("FLOPs per query (inference, plus amortised RL training)")
    axis.set_ylabel("accuracy")
    axis.set_title("Accuracy vs test-time compute")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / PLOT_FILE, dpi=110)
    plt.close(figure)
    with open(out_dir / TABLE_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "method", "n", "accuracy", "flops_per_query"])
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# Accuracy vs compute per query", "",
             "| model | method | n | accuracy | FLOPs / query |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['method']} | {r['n']} | {r['accuracy']:.4f} | {r['flops_per_query']:.3g} |" for r in rows]
    lines += ["", "Best method within each budget:", "", "| queries | budget (FLOPs / query) | best | accuracy |",
              "|---:|---:|---|---:|"]
    lines += [f"| {v['queries']:,} | {v['budget_flops']:.3g} | {v['winner']} | {v['accuracy']:.4f} |".replace("| 0 |", "| - |", 1)
              for v in verdicts]
    if rl_training_flops is None:
        lines += ["", "No RL model evaluated yet: the table compares test-time methods of the SFT model only."]
    (out_dir / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    best_overall = max(sft_points, key=lambda p: p["accuracy"])
    metrics = {"best_sft_method": f"{best_overall['method']}@{best_overall['n']}", "best_sft_accuracy": best_overall["accuracy"],
               "rl_training_flops": rl_training_flops}
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def compare_test_time_compute(config: CompareConfig, evaluation: str, dest: str, rl_evaluation: str | None = None,
                              overwrite: bool = False) -> Manifest:
    inputs = {"evaluation": evaluation, **({"rl_evaluation": rl_evaluation} if rl_evaluation else {})}
    return produce(SPEC, config, inputs, dest, lambda out_dir, paths: _build(config, paths, out_dir), overwrite=overwrite)
