"""Does GRPO learn? The same GRPO run from the same SFT model over several seeds, and the
held-out accuracy before, during and after it, as mean +- std over the seeds: a table, a PNG
of accuracy against step, metrics.json. The seeds change the prompt order and every sampled
completion, so their spread is the run-to-run noise the gain is compared with.

Each seed is a `grpo` run published at `DEST.seeds/seed<k>` (the flow runs them as parallel
tasks); the study artifact only aggregates them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ArtifactRef, ComponentSpec, Manifest, produce, read_manifest
from components.config import StrictConfig
from components.runlog import read_metrics
from components.train.grpo import GRPOConfig, grpo
from components.train.rl import HELDOUT_FILE

SPEC = ComponentSpec(name="grpo_study", version="1")
REPORT_FILE = "report.md"
PLOT_FILE = "heldout_accuracy.png"
CURVE_FILE = "heldout_accuracy.csv"
METRICS_FILE = "metrics.json"
MEASURES = (("heldout_sampled_accuracy", "held-out pass@1 (sampled)"), ("heldout_accuracy", "held-out greedy accuracy"))


class GRPOStudyConfig(StrictConfig):
    base: GRPOConfig = GRPOConfig()
    seeds: list[int] = Field([0, 1, 2], min_length=1)


def seed_name(seed: int) -> str:
    return f"seed_{seed}"


def plan_seeds(config: GRPOStudyConfig, dest: str) -> list[tuple[str, GRPOConfig, str]]:
    """(name, config, destination) of every seed's run: the base config with train.seed = k."""
    return [(seed_name(seed), config.base.model_copy(update={"train": config.base.train.model_copy(update={"seed": seed})}),
             f"{dest.rstrip('/')}.seeds/seed{seed}") for seed in config.seeds]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _mean_std_rows(curves: dict[int, list[dict[str, Any]]], at: dict[int, dict[int, dict[str, Any]]], steps: list[int],
                   measures: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per step, each measure's mean and std over the seeds: the rows of heldout_accuracy.csv."""
    rows = []
    for step in steps:
        row: dict[str, Any] = {"step": step}
        for key, _ in measures:
            mean, std = _mean_std([at[seed][step][key] for seed in curves])
            row[f"{key}_mean"], row[f"{key}_std"] = mean, std
        rows.append(row)
    return rows


def _gain_metrics(curves: dict[int, list[dict[str, Any]]], at: dict[int, dict[int, dict[str, Any]]], steps: list[int],
                  measures: list[tuple[str, str]]) -> dict[str, Any]:
    """Per measure, the means before and after, the spread after, and the gain's mean, std and mean / std."""
    metrics: dict[str, Any] = {"seeds": len(curves), "steps": steps[-1]}
    for key, _ in measures:
        before = [at[seed][steps[0]][key] for seed in curves]
        after = [at[seed][steps[-1]][key] for seed in curves]
        gains = [a - b for a, b in zip(after, before)]
        gain_mean, gain_std = _mean_std(gains)
        metrics.update({f"{key}_before_mean": statistics.fmean(before), f"{key}_after_mean": statistics.fmean(after),
                        f"{key}_after_std": _mean_std(after)[1], f"{key}_gain_mean": gain_mean,
                        f"{key}_gain_std": gain_std,
                        f"{key}_gain_in_stds": gain_mean / gain_std if gain_std > 0 else None})
    return metrics


def _write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    """heldout_accuracy.csv: one row per step, each value to 6 significant digits."""
    with open(path, "w", encoding="utf-8") as handle:
        names = list(rows[0])
        handle.write(",".join(names) + "\n")
        handle.writelines(",".join(f"{row[n]:.6g}" for n in names) + "\n" for row in rows)


def _plot_seeds(curves: dict[int, list[dict[str, Any]]], at: dict[int, dict[int, dict[str, Any]]], steps: list[int],
                measures: list[tuple[str, str]], rows: list[dict[str, Any]], path: Path) -> None:
    """The PNG: per measure, every seed's curve and the mean +- std band against the GRPO step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for axis, (key, label) in zip(axes[0], measures):
        for seed in curves:
            axis.plot(steps, [at[seed][s][key] for s in steps], color="tab:blue", alpha=0.3, linewidth=1)
        means = [row[f"{key}_mean"] for row in rows]
        stds = [row[f"{key}_std"] for row in rows]
        axis.plot(steps, means, color="tab:blue", linewidth=2, label=f"mean of {len(curves)} seeds")
        axis.fill_between(steps, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                          color="tab:blue", alpha=0.15, label="+- 1 std")
        axis.set_xlabel("GRPO step")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle("GRPO from the SFT model: held-out accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _report_lines(config: GRPOStudyConfig, curves: dict[int, list[dict[str, Any]]], steps: list[int],
                  measures: list[tuple[str, str]], rows: list[dict[str, Any]], metrics: dict[str, Any]) -> list[str]:
    """report.md's lines: the setting, the per-step table and the before/after/gain table."""
    lines = [f"# GRPO study: {len(curves)} seeds, {steps[-1]} steps", "",
             f"Each seed is a GRPO run from the same SFT model ({config.base.group_size} samples per prompt, "
             f"{config.base.train.batch_size_rows} prompts per step, learning rate "
             f"{config.base.train.optim.learning_rate:g}); held-out accuracy on the same "
             f"{curves[next(iter(curves))][0]['problems']} problems, mean +- std over the seeds.", "",
             "| step | " + " | ".join(label for _, label in measures) + " |",
             "|---:|" + "---:|" * len(measures)]
    lines += [f"| {row['step']} | " + " | ".join(f"{row[f'{key}_mean']:.3f} +- {row[f'{key}_std']:.3f}"
                                               for key, _ in measures) + " |" for row in rows]
    lines += ["", "| measure | before | after | gain (mean +- std over seeds) | gain / std |", "|---|---:|---:|---:|---:|"]
    for key, label in measures:
        ratio = metrics[f"{key}_gain_in_stds"]
        lines.append(f"| {label} | {metrics[f'{key}_before_mean']:.3f} | {metrics[f'{key}_after_mean']:.3f} | "
                     f"{metrics[f'{key}_gain_mean']:+.3f} +- {metrics[f'{key}_gain_std']:.3f} | "
                     f"{'n/a' if ratio is None else f'{ratio:.1f}'} |")
    lines += ["", f"![held-out accuracy]({PLOT_FILE})"]
    return lines


def _summarize(config: GRPOStudyConfig, curves: dict[int, list[dict[str, Any]]], out_dir: Path) -> dict[str, Any]:
    steps = sorted(set.intersection(*(set(r["step"] for r in curve) for curve in curves.values())))
    at = {seed: {r["step"]: r for r in curve} for seed, curve in curves.items()}
    measures = [(key, label) for key, label in MEASURES if all(key in at[s][steps[0]] for s in curves)]
    rows = _mean_std_rows(curves, at, steps, measures)
    metrics = _gain_metrics(curves, at, steps, measures)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    _write_curve(out_dir / CURVE_FILE, rows)
    _plot_seeds(curves, at, steps, measures, rows, out_dir / PLOT_FILE)
    lines = _report_lines(config, curves, steps, measures, rows, metrics)
    (out_dir / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return metrics


def summarize_study(config: GRPOStudyConfig, dest: str, overwrite: bool = False, spec: ComponentSpec = SPEC,
                    **seeds: str | ArtifactRef) -> Manifest:
    """Aggregate the published seed runs (`seed_<k>=URI`) into the study artifact (`spec`:
    this study's, or another GRPO variant's, e.g. agentic GRPO's)."""
    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        curves = {}
        for name in seeds:
            read_manifest(str(paths[name]))  # a published grpo run, not a stray directory
            curves[int(name.removeprefix("seed_"))] = read_metrics(paths[name] / HELDOUT_FILE)
        return _summarize(config, curves, out_dir)

    return produce(spec, config, dict(seeds), dest, build, overwrite=overwrite)


def grpo_study(config: GRPOStudyConfig, model: str, problems: str, heldout: str, dest: str, overwrite: bool = False,
               map_runs: Any = map) -> Manifest:
    """Run GRPO once per seed (published as `DEST.seeds/seed<k>`), then the report."""
    def run(planned: tuple[str, GRPOConfig, str]) -> Manifest:
        return grpo(planned[1], model, problems, planned[2], heldout=heldout, overwrite=overwrite)

    plan = plan_seeds(config, dest)
    manifests = list(map_runs(run, plan))
    return summarize_study(config, dest, overwrite=overwrite,
                           **{name: manifest.output for (name, _, _), manifest in zip(plan, manifests)})
