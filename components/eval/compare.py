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
from components.errors import DataError
from components.eval.accuracy import CURVE_FILE

SPEC = ComponentSpec(name="compare_test_time_compute", version="4")  # 4: no break-even where RL never pays back
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


# Methods usable on a new query: no answer key (the verifier's best-of-n and reflection with
# the verifier's verdict need the reference answer) and no tool; a single sample (n = 1) is.
DEPLOYABLE = ("majority", "best_logprob", "best_reward", "reflection (self)")


def _deployable(point: dict[str, Any]) -> bool:
    return point["method"] in DEPLOYABLE or (point["method"] == "oracle" and point["n"] == 1)


def rl_versus_best_of_n(sft_points: list[dict[str, Any]], rl_points: list[dict[str, Any]],
                        training_flops: float, volumes: list[int]) -> tuple[list[str], dict[str, Any]]:
    """The seed post's question, answered without the answer key or tools: the RL model's single
    sample against the SFT model's best-of-n / majority vote. The SFT model needs C_sft FLOPs per
    query to match the RL model's accuracy (or cannot, up to its largest n); the RL model costs
    C_rl + T / Q. RL is cheaper above the break-even volume Q* = T / (C_sft - C_rl)."""
    rl_single = next(p for p in rl_points if p["method"] == "oracle" and p["n"] == 1)
    deployable = sorted((p for p in sft_points if _deployable(p)), key=lambda p: p["flops_per_query"])
    matching = [p for p in deployable if p["accuracy"] >= rl_single["accuracy"]]
    best = max(deployable, key=lambda p: p["accuracy"])
    lines = ["", "## RL vs best-of-n (no answer key, no tool)", "",
             f"RL model, one sample: accuracy {rl_single['accuracy']:.4f} at {rl_single['flops_per_query']:.3g} "
             f"inference FLOPs per query, plus {training_flops:.3g} training FLOPs in all.",
             f"SFT model's best answer-key-free method: {best['method']}@{best['n']} = {best['accuracy']:.4f} at "
             f"{best['flops_per_query']:.3g} FLOPs per query."]
    metrics: dict[str, Any] = {"rl_single_sample_accuracy": rl_single["accuracy"],
                               "sft_best_deployable_accuracy": best["accuracy"],
                               "sft_best_deployable_method": f"{best['method']}@{best['n']}"}
    if matching:
        cheapest = matching[0]
        extra = cheapest["flops_per_query"] - rl_single["flops_per_query"]
        breakeven = training_flops / extra if extra > 0 else None  # None: RL never pays for its training
        lines.append(f"The SFT model matches it with {cheapest['method']}@{cheapest['n']} at "
                     f"{cheapest['flops_per_query']:.3g} FLOPs per query: " + (
                         f"RL is cheaper above **{breakeven:,.0f} queries** (break-even)." if breakeven is not None
                         else "no more than the RL model's own inference, so **RL is cheaper at no query volume** "
                              "(no break-even)."))
    else:
        extra = best["flops_per_query"] - rl_single["flops_per_query"]
        breakeven = training_flops / extra if extra > 0 else None
        largest_n = max(p["n"] for p in deployable)
        lines.append(f"No answer-key-free method of the SFT model reaches it up to n = {largest_n}: RL is more "
                     f"accurate at every volume, and also cheaper than that largest n above "
                     f"**{breakeven:,.0f} queries**." if breakeven is not None else
                     "No answer-key-free method of the SFT model reaches it.")
    metrics["breakeven_queries"] = breakeven
    for volume in volumes:
        cost = rl_single["flops_per_query"] + training_flops / volume
        within = [p for p in deployable if p["flops_per_query"] <= cost]
        rival = max(within, key=lambda p: p["accuracy"]) if within else None
        verdict = ("RL" if rival is None or rl_single["accuracy"] > rival["accuracy"] else "best-of-n / majority")
        rival_text = (f"the SFT model's best within that budget is {rival['method']}@{rival['n']} = "
                      f"{rival['accuracy']:.4f}" if rival else "no SFT method fits that budget")
        largest = deployable[-1]["flops_per_query"]
        caveat = (f" (at {cost / largest:.0f}x the compute of the largest n measured: a larger n might do better)"
                  if cost > largest else "")
        lines.append(f"- {volume:,} queries: RL costs {cost:.3g} FLOPs per query for {rl_single['accuracy']:.4f}; "
                     f"{rival_text}; **{verdict} wins**{caveat}.")
    return lines, metrics


def _best_within(points: list[dict[str, Any]], budget: float) -> dict[str, Any] | None:
    affordable = [p for p in points if p["flops_per_query"] <= budget]
    return max(affordable, key=lambda p: (p["accuracy"], -p["flops_per_query"])) if affordable else None


# What names the tasks an evaluation ran: an agent evaluation's environment, count and first test
# seed; an accuracy evaluation's problem count (with its dataset, compared by content).
TASK_METRICS = ("env", "tasks", "first_test_seed", "problems_used")


def _task_differences(sft: Manifest, rl: Manifest) -> list[str]:
    """What differs between the tasks of two evaluations' manifests (empty: the same tasks)."""
    differ = [f"{key} {sft.metrics.get(key)} vs {rl.metrics.get(key)}" for key in TASK_METRICS
              if sft.metrics.get(key) != rl.metrics.get(key)]
    sft_data, rl_data = sft.inputs.get("dataset"), rl.inputs.get("dataset")
    if sft_data and rl_data and sft_data.content_hash != rl_data.content_hash:
        differ.append(f"dataset {sft_data.uri} vs {rl_data.uri}")
    sft_env, rl_env = ({k: v for k, v in (m.config.get("env") or {}).items() if k != "tools"} for m in (sft, rl))
    if sft_env != rl_env:  # the same environment name with other settings (digits, steps, hops, files)
        differ.append(f"env settings {sft_env} vs {rl_env}")
    return differ


def check_same_tasks(paths: dict[str, Path]) -> None:
    """Refuse to compare an SFT and an RL evaluation of different tasks (another environment or
    its settings, another slice of the test split, another dataset or problem count): their
    accuracies would not be comparable. Tools may differ: that is what is compared."""
    if "rl_evaluation" not in paths:
        return
    differ = _task_differences(*(read_manifest(str(paths[name])) for name in ("evaluation", "rl_evaluation")))
    if differ:
        raise DataError(f"{paths['evaluation']} and {paths['rl_evaluation']} evaluated different tasks "
                        f"({'; '.join(differ)}): compare evaluations of the same tasks")


def _rl_training_flops(paths: dict[str, Path]) -> float | None:
    """The RL model's training FLOPs, from its manifest's metrics (None without an RL evaluation)."""
    rl_training_flops = None
    if "rl_evaluation" in paths:
        rl_model = read_manifest(str(paths["rl_evaluation"])).inputs["model"].uri
        rl_training_flops = float(read_manifest(rl_model).metrics.get("training_flops", 0.0))
    return rl_training_flops


def _plot_sft_methods(axis: Any, sft_points: list[dict[str, Any]]) -> None:
    """One line per SFT method: accuracy against FLOPs per query."""
    methods = sorted({p["method"] for p in sft_points})
    for method in methods:
        curve = sorted((p for p in sft_points if p["method"] == method), key=lambda p: p["flops_per_query"])
        axis.plot([p["flops_per_query"] for p in curve], [p["accuracy"] for p in curve], marker="o", label=f"SFT {method}")


def _plot_rl_oracle(axis: Any, rl_points: list[dict[str, Any]], volume: int) -> None:
    """The RL model's oracle line at one query volume: accuracy against amortised FLOPs per query."""
    curve = sorted((p for p in rl_points if p["method"] == "oracle"), key=lambda p: p["flops_per_query"])
    axis.plot([p["flops_per_query"] for p in curve], [p["accuracy"] for p in curve], marker="s",
              linestyle="--", label=f"RL, {volume:,} queries")


def _budget_winners(points: list[dict[str, Any]], volume: int) -> list[dict[str, Any]]:
    """At each compute budget among `points`, the most accurate point within it, at one query volume."""
    verdicts = []
    budgets = sorted({p["flops_per_query"] for p in points})
    for budget in budgets:
        best = _best_within(points, budget)
        verdicts.append({"queries": volume, "budget_flops": budget, "winner": f"{best['model']} {best['method']}@{best['n']}",
                         "accuracy": best["accuracy"]})
    return verdicts


def _save_plot(figure: Any, axis: Any, path: Path) -> None:
    """Label the accuracy-vs-compute axes (log FLOPs) and write the PNG."""
    axis.set_xscale("log")
    axis.set_xlabel("FLOPs per query (inference, plus amortised RL training)")
    axis.set_ylabel("accuracy")
    axis.set_title("Accuracy vs test-time compute")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _write_table(path: Path, rows: list[dict[str, Any]]) -> None:
    """accuracy_vs_compute.csv: every point, SFT then RL per query volume."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["model", "method", "n", "accuracy", "flops_per_query"])
        writer.writeheader()
        writer.writerows(rows)


def _table_lines(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]]) -> list[str]:
    """report.md's tables: every point, then the best method within each budget."""
    lines = ["# Accuracy vs compute per query", "",
             "| model | method | n | accuracy | FLOPs / query |", "|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['method']} | {r['n']} | {r['accuracy']:.4f} | {r['flops_per_query']:.3g} |" for r in rows]
    lines += ["", "Best method within each budget:", "", "| queries | budget (FLOPs / query) | best | accuracy |",
              "|---:|---:|---|---:|"]
    lines += [f"| {v['queries']:,} | {v['budget_flops']:.3g} | {v['winner']} | {v['accuracy']:.4f} |".replace("| 0 |", "| - |", 1)
              for v in verdicts]
    return lines


def _build(config: CompareConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    check_same_tasks(paths)
    sft_points = _read_curve(paths["evaluation"], "sft")
    rl_training_flops = _rl_training_flops(paths)
    rows: list[dict[str, Any]] = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    _plot_sft_methods(axis, sft_points)
    rows += sft_points
    verdicts, rl_points_raw = [], None
    if rl_training_flops is not None:
        rl_points_raw = _read_curve(paths["rl_evaluation"], "rl")
    for volume in (config.query_volumes if rl_training_flops is not None else [0]):
        points = list(sft_points)
        if rl_training_flops is not None:
            rl_points = _read_curve(paths["rl_evaluation"], f"rl (amortised over {volume:,} queries)",
                                    rl_training_flops / volume)
            points += rl_points
            rows += rl_points
            _plot_rl_oracle(axis, rl_points, volume)
        verdicts += _budget_winners(points, volume)
    _save_plot(figure, axis, out_dir / PLOT_FILE)
    plt.close(figure)
    _write_table(out_dir / TABLE_FILE, rows)
    lines = _table_lines(rows, verdicts)
    best_overall = max(sft_points, key=lambda p: p["accuracy"])
    metrics = {"best_sft_method": f"{best_overall['method']}@{best_overall['n']}", "best_sft_accuracy": best_overall["accuracy"],
               "rl_training_flops": rl_training_flops}
    if rl_training_flops is None:
        lines += ["", "No RL model evaluated yet: the table compares test-time methods of the SFT model only."]
    else:
        verdict_lines, verdict_metrics = rl_versus_best_of_n(sft_points, rl_points_raw, rl_training_flops,
                                                             config.query_volumes)
        lines = lines[:2] + verdict_lines[1:] + [""] + lines[2:]
        metrics.update(verdict_metrics)
    (out_dir / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def compare_test_time_compute(config: CompareConfig, evaluation: str, dest: str, rl_evaluation: str | None = None,
                              overwrite: bool = False) -> Manifest:
    inputs = {"evaluation": evaluation, **({"rl_evaluation": rl_evaluation} if rl_evaluation else {})}
    return produce(SPEC, config, inputs, dest, lambda out_dir, paths: _build(config, paths, out_dir), overwrite=overwrite)
