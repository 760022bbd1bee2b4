"""The procedural arithmetic task: seeded, GSM8K-formatted, correct, split without overlap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.tasks.arithmetic import ArithmeticTaskConfig, arithmetic_task, generate
from components.tasks.calculator import evaluate_arithmetic
from components.tasks.verifiers import is_correct


def test_problems_are_correct_reproducible_and_disjoint(tmp_path: Path) -> None:
    config = ArithmeticTaskConfig(train_problems=500, test_problems=100, validation_problems=80, max_steps=3, seed=7)
    splits = generate(config)
    assert splits == generate(config) and splits != generate(config.model_copy(update={"seed": 8}))
    questions = {split: {r["question"] for r in rows} for split, rows in splits.items()}
    assert {split: len(q) for split, q in questions.items()} == {"train": 500, "test": 100, "validation": 80}
    assert not questions["train"] & questions["test"] and not questions["validation"] & (
        questions["train"] | questions["test"])
    for row in splits["train"] + splits["test"] + splits["validation"]:
        assert is_correct(row["answer"], row["answer"])
        steps = re.findall(r"<<([^=]+)=(-?\d+)>>", row["answer"])
        assert 1 <= len(steps) <= 3
        assert all(evaluate_arithmetic(expr) == int(value) >= 0 for expr, value in steps)  # every annotation is right
    manifest = arithmetic_task(config, str(tmp_path / "task"))
    assert manifest.metrics == {"train_problems": 500, "test_problems": 100, "validation_problems": 80}
    for split in ("train", "test", "validation"):
        rows = [json.loads(line) for line in (tmp_path / f"task/{split}.jsonl").read_text().splitlines()]
        assert rows == splits[split], split


def test_validation_is_drawn_last_so_train_and_test_do_not_depend_on_it() -> None:
    """Monitoring on validation must not change what is trained on or reported: the train and
    test problems are the same whatever the validation size (they were generated before
    validation existed), and the validation split of a larger size extends the smaller one."""
    small = generate(ArithmeticTaskConfig(train_problems=300, test_problems=50, validation_problems=1, max_steps=2))
    large = generate(ArithmeticTaskConfig(train_problems=300, test_problems=50, validation_problems=120, max_steps=2))
    assert small["train"] == large["train"] and small["test"] == large["test"]
    assert large["validation"][:1] == small["validation"]


def test_bad_task_configs_are_refused() -> None:
    with pytest.raises(ValidationError, match=r"min_steps \(3\) exceeds max_steps \(2\)"):
        ArithmeticTaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError, match="cannot draw 5000 distinct"):
        generate(ArithmeticTaskConfig(train_problems=5000, test_problems=10, max_steps=1, max_operand=3))


SPLIT_ARTIFACTS = {"arithmetic_task", "real_arithmetic_task", "real_splits"}  # artifacts whose files are splits


def test_only_the_final_evaluations_read_test_and_dvc_tracks_the_files_each_stage_reads() -> None:
    """Held-out monitoring (the RL trainers' curves, which their settings were chosen by) reads
    validation; test is read only by the evaluations whose numbers are reported. dvc.yaml
    depends on exactly the split files the stage table names, so regenerating validation
    reruns no SFT stage and no evaluation."""
    import yaml

    from components.tasks.arithmetic import SPLITS
    from flows.stages import STAGES
    from tests.conftest import REPO_ROOT

    readers = {split: {stage.name for stage in STAGES if f"arithmetic_task/{split}.jsonl" in stage.inputs.values()}
               for split in SPLITS}
    assert readers["test"] == {"evaluate_arithmetic_sft", "evaluate_grpo"}
    assert readers["validation"] == {"grpo", "grpo_study", "ppo"}
    assert all(stage.inputs["heldout"] == "arithmetic_task/validation.jsonl"
               for stage in STAGES if stage.name in readers["validation"])
    dvc_stages = {dvc_file: yaml.safe_load((REPO_ROOT / dvc_file).read_text())["stages"]
                  for dvc_file in {stage.dvc_file for stage in STAGES}}
    for stage in STAGES:  # each stage against the DVC file that holds it (dvc.yaml, real/dvc.yaml)
        split_files = {source for source in stage.inputs.values() if source.split("/")[0] in SPLIT_ARTIFACTS}
        deps = {dep.removeprefix("${artifacts_root}/") for dep in dvc_stages[stage.dvc_file][stage.name].get("deps", [])
                if dep.removeprefix("${artifacts_root}/").split("/")[0] in SPLIT_ARTIFACTS}
        assert deps == split_files, stage.name


def test_in_the_real_chain_test_splits_are_read_only_by_the_reported_evaluations() -> None:
    """The real chain's GSM8K split (`real_splits`) and arithmetic task: training and GRPO's
    held-out curve read train and validation; test is read only by the evaluations in the report
    and the test-time-compute pools."""
    from flows.stages import REAL_STAGES

    readers = {source: {stage.name for stage in REAL_STAGES if source in stage.inputs.values()}
               for source in ("real_splits/test.jsonl", "real_arithmetic_task/test.jsonl",
                              "real_splits/validation.jsonl", "real_arithmetic_task/validation.jsonl")}
    evaluations = {f"real_{model}_{task}" for model in ("base", "sft", "grpo", "dpo") for task in ("gsm8k", "arithmetic")}
    assert readers["real_splits/test.jsonl"] == {name for name in evaluations if name.endswith("gsm8k")}
    assert readers["real_arithmetic_task/test.jsonl"] == (
        {name for name in evaluations if name.endswith("arithmetic")} | {"real_sft_pools", "real_grpo_pools"})
    assert readers["real_splits/validation.jsonl"] == {"real_heldout_data"}
    assert readers["real_arithmetic_task/validation.jsonl"] == {"real_grpo_study"}


@pytest.mark.parametrize("operations,symbols", [(["+"], {"+"}), (["-", "*"], {"-", "*"}), (["*"], {"*"})])
def test_difficulty_sets_the_operations_the_operand_sizes_and_the_steps(operations, symbols) -> None:
    config = ArithmeticTaskConfig(operations=operations, min_operand=10, max_operand=99, min_steps=2, max_steps=2,
                                  train_problems=40, test_problems=20, validation_problems=20, seed=3)
    for rows in generate(config).values():
        for row in rows:
            steps = re.findall(r"<<(\d+)([-+*])(\d+)=(\d+)>>", row["answer"])
            assert len(steps) == 2
            assert {symbol for _, symbol, _, _ in steps} <= symbols
            first_total = int(steps[0][0])
            assert 10 <= first_total <= 99
            for _, symbol, operand, _ in steps:
                assert symbol == "-" or 10 <= int(operand) <= 99
            assert is_correct(row["answer"], row["answer"].rsplit("#### ", 1)[1])


def test_difficulty_knobs_are_checked() -> None:
    with pytest.raises(ValidationError, match="min_operand"):
        ArithmeticTaskConfig(min_operand=30, max_operand=20)
    with pytest.raises(ValidationError, match="twice"):
        ArithmeticTaskConfig(operations=["+", "+"])
    with pytest.raises(ValidationError):
        ArithmeticTaskConfig(operations=["/"])
