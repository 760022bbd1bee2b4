"""`crucible estimate --compute-budget FLOPS` on its own: N*, D*, the predicted loss and the
law; with a GPU, a dense shape near N* and its time, cost and memory plan."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.feasibility.budget import BudgetConfig, advise, dense_shape_near, shape_for_layers
from components.feasibility.scaling import compute_optimal
from tests.conftest import run_cli

CHINCHILLA_BUDGET = 5.76e23  # Hoffmann et al. 2022: Gopher's and Chinchilla's budget


def test_budget_alone_gives_the_law_and_a_shape_without_hardware() -> None:
    result = advise(BudgetConfig(compute_budget_flops=CHINCHILLA_BUDGET))
    optimal = compute_optimal(CHINCHILLA_BUDGET, "epoch2024")
    assert (result["params"], result["tokens"], result["predicted_loss"]) == (
        optimal["params"], optimal["tokens"], optimal["predicted_loss"])
    assert 6 * result["params"] * result["tokens"] == pytest.approx(CHINCHILLA_BUDGET)
    assert "Besiroglu et al. 2024" in result["law"] and result["scaling_law"] == "epoch2024"
    assert "estimate" not in result  # no hardware named: sizing only
    assert result["shape_params"] == pytest.approx(result["params"], rel=0.05)


@pytest.mark.parametrize("budget", [1e20, 1e22, 5.76e23, 1e25])
def test_the_shape_is_the_rule_nearest_n_star(budget: float) -> None:
    config = BudgetConfig(compute_budget_flops=budget)
    target = compute_optimal(budget)["params"]
    shape = dense_shape_near(target, config)
    assert shape.d_model == shape.num_heads * 128 and shape.d_model == pytest.approx(128 * shape.num_layers, abs=64)
    assert shape.ffn_dim % 256 == 0 and shape.ffn_dim >= 8 * shape.d_model / 3
    neighbours = [shape_for_layers(shape.num_layers + step, config).parameter_count() for step in (-1, 1)]
    assert all(abs(n - target) / target >= abs(shape.parameter_count() - target) / target * 0.999 for n in neighbours)


def test_budget_with_hardware_estimates_the_suggested_shape() -> None:
    result = advise(BudgetConfig(compute_budget_flops=CHINCHILLA_BUDGET, gpu="H100-SXM", num_gpus=1024,
                                 price_per_gpu_hour=2.0))
    estimate = result["estimate"]
    assert estimate["params"] == result["shape_params"] and estimate["tokens"] == result["tokens"]
    assert estimate["training_flops"] == pytest.approx(result["shape_training_flops"])
    assert estimate["gpu_hours"] == pytest.approx(estimate["training_flops"] / (0.4 * 989e12) / 3600)
    assert estimate["cost_usd"] == pytest.approx(2.0 * estimate["gpu_hours"])
    assert estimate["memory_checked"] and estimate["recommendation"]["fits"]  # a plan that fits, with its config
    assert estimate["deepspeed_config"]["zero_optimization"]["stage"] == estimate["recommendation"]["plan"]["zero_stage"]


def test_cli_budget_alone(tmp_path: Path) -> None:
    out = run_cli("estimate", "--compute-budget", "5.76e23", "--gpu", "h100", "--num-gpus", "1024", "--json",
                  "--output", str(tmp_path / "budget"), check=True)
    data = json.loads(out.stdout)
    assert data["estimate"]["gpu"] == "H100-SXM" and data["estimate"]["num_gpus"] == 1024
    assert set(data) >= {"params", "tokens", "predicted_loss", "law", "shape", "shape_rule", "estimate"}
    assert "# What to train with 5.760e+23 FLOPs" in (tmp_path / "budget/estimate.md").read_text()
    markdown = run_cli("estimate", "--compute-budget", "1e21", check=True).stdout
    assert "N* (parameters)" in markdown and "Give --gpu (and --num-gpus)" in markdown


@pytest.mark.parametrize(("args", "expected"), [
    (["--compute-budget", "1e21", "--tokens", "1e9"], "--tokens: the budget sets the tokens"),
    (["--compute-budget", "1e21", "--mfu", "0.5"], "--mfu: need --gpu or --num-gpus"),
    (["--compute-budget", "1e21", "--aspect-ratio", "0"], "--aspect-ratio: Input should be greater than 0"),
    (["--params", "1e9", "--tokens", "1e9", "--aspect-ratio", "64"], "--aspect-ratio: only with --compute-budget"),
])
def test_budget_flags_that_would_be_ignored_are_refused(args: list[str], expected: str) -> None:
    result = run_cli("estimate", *args)
    assert result.returncode == 1 and expected in result.stderr, result.stderr
