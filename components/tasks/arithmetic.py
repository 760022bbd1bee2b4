"""A procedurally generated, seeded arithmetic word-problem task in GSM8K's format.

Tiny models trained from scratch on a CPU cannot solve GSM8K, so RL and test-time compute
are studied on problems whose difficulty is set by three knobs: the number of steps
(`min_steps`..`max_steps` operations), which operations (`operations`, from +, - and x) and
the size of the numbers (`min_operand`..`max_operand`: 10..99 for two digits); a story of
those operations, worked in GSM8K style with calculator annotations and a final
`#### N`. The splits are drawn from one seeded stream (test, then train, then validation),
so the data is reproducible without being stored, and no question occurs in two splits.

Validation is for monitoring and tuning (the RL trainers' held-out curves); test is for the
final numbers only, so a choice made by looking at a curve never leaks into a reported
figure. Validation is drawn last so that adding it left the train and test bytes of
earlier versions unchanged (and everything trained or evaluated on them reusable).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig

SPEC = ComponentSpec(name="arithmetic_task", version="2")
SPLITS = ("test", "train", "validation")  # the order they are drawn in
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo", "Nora"]
ITEMS = ["apples", "pens", "stickers", "marbles", "books", "coins", "cards", "shells", "stamps", "cookies"]


class ArithmeticTaskConfig(StrictConfig):
    train_problems: int = Field(4000, gt=0)
    test_problems: int = Field(200, gt=0, description="Final evaluation only.")
    validation_problems: int = Field(200, gt=0, description="Held-out monitoring and tuning (RL curves).")
    min_steps: int = Field(1, ge=1, description="Fewest operations in a problem.")
    max_steps: int = Field(3, ge=1, description="Most operations in a problem.")
    min_operand: int = Field(2, ge=2, description="Operands are drawn from min_operand..max_operand.")
    max_operand: int = Field(20, ge=2, description="Operands are drawn from min_operand..max_operand.")
    operations: list[Literal["+", "-", "*"]] = Field(
        ["+", "-", "*"], min_length=1, description="The operations a step draws from (x is skipped while "
                                                   "total x max_operand exceeds 10,000 unless it is the only one; - on "
                                                   "a total below 2 becomes +).")
    seed: int = 0

    @model_validator(mode="after")
    def _steps_ordered(self) -> "ArithmeticTaskConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")
        if self.min_operand > self.max_operand:
            raise ValueError(f"min_operand ({self.min_operand}) exceeds max_operand ({self.max_operand})")
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"operations {self.operations} lists one twice")
        return self


def make_problem(rng: random.Random, config: ArithmeticTaskConfig) -> dict[str, str]:
    """One problem: {"question", "answer"} with worked steps and `#### N` (never negative)."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    total = rng.randint(config.min_operand, config.max_operand)
    sentences = [f"{name} has {total} {item}."]
    work = []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        small = total * config.max_operand <= 10_000
        operation = rng.choice([op for op in config.operations if op != "*" or small] or config.operations)
        if operation == "-" and total < 2:
            operation = "+"
        operand = rng.randint(1, total - 1) if operation == "-" else rng.randint(config.min_operand, config.max_operand)
        new_total = {"+": total + operand, "-": total - operand, "*": total * operand}[operation]
        sentences.append({
            "+": f"Then {name} gets {operand} more.",
            "-": f"Then {name} gives away {operand}.",
            "*": f"Then the number of {item} becomes {operand} times as many.",
        }[operation])
        symbol = {"*": "*"}.get(operation, operation)
        work.append(f"{total} {symbol} {operand} = <<{total}{symbol}{operand}={new_total}>>{new_total}")
        total = new_total
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    answer = "\n".join(work) + f"\n#### {total}"
    return {"question": question, "answer": answer}


def generate(config: ArithmeticTaskConfig) -> dict[str, list[dict[str, str]]]:
    """Every split, drawn in `SPLITS` order from one stream; no question is in two splits."""
    rng = random.Random(config.seed)
    seen: set[str] = set()
    splits: dict[str, list[dict[str, str]]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        count = getattr(config, f"{split}_problems")
        attempts = 0
        while len(splits[split]) < count:
            attempts += 1
            if attempts > 50 * count:
                raise ValueError(f"cannot draw {count} distinct {split} problems; raise max_operand or max_steps")
            problem = make_problem(rng, config)
            if problem["question"] in seen:
                continue
            seen.add(problem["question"])
            splits[split].append(problem)
    return splits


def _build(config: ArithmeticTaskConfig, out_dir: Path) -> dict[str, Any]:
    splits = generate(config)
    for split, rows in splits.items():
        with open(out_dir / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return {f"{split}_problems": len(rows) for split, rows in splits.items()}


def arithmetic_task(config: ArithmeticTaskConfig, dest: str, overwrite: bool = False) -> Manifest:
    """Write `train.jsonl`, `validation.jsonl` and `test.jsonl` (GSM8K fields: question,
    answer) into `dest`."""
    return produce(SPEC, config, {}, dest, lambda out_dir, paths: _build(config, out_dir), overwrite=overwrite)
