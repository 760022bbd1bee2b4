"""Validation and test subsets of a benchmark: tune on one, report on the other, train on neither.

Invariant: no problem is in two of the output files. `validation.jsonl` is a seeded sample of
the source's training file and `train.jsonl` is the rest of it (in file order), so nothing
tuned on validation was trained on; `test.jsonl` is a seeded sample of the source's test
file, read only by the evaluations whose numbers are reported. Rows are copied as they are
(every field kept), each checked first to be a scoreable problem (`read_problems`), so a bad
row is named with its file and line before anything is written.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.errors import DataError
from components.records import read_jsonl
from components.tasks.problems import read_problems

SPEC = ComponentSpec(name="problem_splits", version="1")


class ProblemSplitsConfig(StrictConfig):
    format: Literal["gsm8k", "rl"] = Field("gsm8k", description="gsm8k: question/answer; rl: prompt/reference_answer.")
    validation_problems: int = Field(200, gt=0, description="Drawn from the training file; tuning only.")
    test_problems: int = Field(200, gt=0, description="Drawn from the test file; final numbers only.")
    seed: int = 0


def sample_rows(path: Path, fmt: str, count: int, seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(`count` rows drawn without replacement by `seed`, the other rows), both in file order;
    every row checked to be a problem of format `fmt`."""
    read_problems(path, fmt, limit=2**62)  # names the first bad row
    rows = [record for _, record in read_jsonl(path)]
    if count > len(rows):
        raise DataError(f"{path}: asked for {count} problems, the file has {len(rows)}")
    chosen = set(random.Random(seed).sample(range(len(rows)), count))
    return ([row for i, row in enumerate(rows) if i in chosen], [row for i, row in enumerate(rows) if i not in chosen])


def _write(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _build(config: ProblemSplitsConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    validation, train = sample_rows(paths["train"], config.format, config.validation_problems, config.seed)
    test, _ = sample_rows(paths["test"], config.format, config.test_problems, config.seed)
    for name, rows in (("train", train), ("validation", validation), ("test", test)):
        _write(out_dir / f"{name}.jsonl", rows)
    return {"train_problems": len(train), "validation_problems": len(validation), "test_problems": len(test)}


def problem_splits(config: ProblemSplitsConfig, train: str, test: str, dest: str, overwrite: bool = False) -> Manifest:
    """Write `train.jsonl`, `validation.jsonl` (from `train`) and `test.jsonl` (from `test`) into `dest`."""
    return produce(SPEC, config, {"train": train, "test": test}, dest,
                   lambda out_dir, paths: _build(config, paths, out_dir), overwrite=overwrite)
