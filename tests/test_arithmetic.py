"""The procedural arithmetic task: seeded, GSM8K-formatted, correct, split without overlap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.data.arithmetic import ArithmeticTaskConfig, arithmetic_task, generate
from components.eval.calculator import evaluate_arithmetic
from components.eval.verifiers import is_correct


def test_problems_are_correct_reproducible_and_disjoint(tmp_path: Path) -> None:
    config = ArithmeticTaskConfig(train_problems=500, test_problems=100, max_steps=3, seed=7)
    splits = generate(config)
    assert splits == generate(config) and splits != generate(config.model_copy(update={"seed": 8}))
    assert not {r["question"] for r in splits["train"]} & {r["question"] for r in splits["test"]}
    for row in splits["train"] + splits["test"]:
        assert is_correct(row["answer"], row["answer"])
        steps = re.findall(r"<<([^=]+)=(-?\d+)>>", row["answer"])
        assert 1 <= len(steps) <= 3
        assert all(evaluate_arithmetic(expr) == int(value) >= 0 for expr, value in steps)  # every annotation is right
    manifest = arithmetic_task(config, str(tmp_path / "task"))
    assert manifest.metrics == {"train_problems": 500, "test_problems": 100}
    rows = [json.loads(line) for line in (tmp_path / "task/test.jsonl").read_text().splitlines()]
    assert rows == splits["test"]


def test_bad_task_configs_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"min_steps \(3\) exceeds max_steps \(2\)"):
        ArithmeticTaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="cannot draw 5000 distinct"):
        generate(ArithmeticTaskConfig(train_problems=5000, test_problems=10, max_steps=1, max_operand=3))
