"""Multi-step arithmetic on numbers too large to compute reliably in-model: a task for the calculator.

Invariant: the answer is the exact integer value of the question's expression, and each entry
of `steps` is one binary operation whose operands are the previous step's result and a number
of the question, so calling a calculator on the steps in order computes the answer.

Difficulty has two knobs: `digits` (the size of the starting number and of every added or
subtracted number; multipliers have `max(2, digits // 2)` digits so products stay in the
calculator's range) and the number of operations (`min_steps`..`max_steps`). Only + - and x:
there is no division, so every intermediate value is an integer. Subtraction never goes below
zero (it becomes an addition), and an operation whose result would pass the calculator's bound
(`components.tasks.calculator.MAX_MAGNITUDE`) becomes a subtraction.
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.tasks.calculator import MAX_MAGNITUDE


class BigArithmeticConfig(StrictConfig):
    digits: int = Field(5, ge=2, le=9, description="Digits of the starting number and of each added or "
                                                   "subtracted number.")
    min_steps: int = Field(2, ge=1, le=12, description="Fewest operations in a problem.")
    max_steps: int = Field(3, ge=1, le=12, description="Most operations in a problem.")

    @model_validator(mode="after")
    def _steps_ordered(self) -> "BigArithmeticConfig":
        if self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")
        return self


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


def _apply(total: int, operation: str, operand: int) -> int:
    return {"+": total + operand, "-": total - operand, "*": total * operand}[operation]


def problem(config: BigArithmeticConfig, seed: int) -> dict[str, Any]:
    """{question, answer (the integer, as text), steps (one "a op b" expression per operation)}."""
    rng = random.Random(seed)
    total = _number(rng, config.digits)
    expression, steps = str(total), []
    for _ in range(rng.randint(config.min_steps, config.max_steps)):
        operation = rng.choice("+-*")
        operand = _number(rng, max(2, config.digits // 2) if operation == "*" else config.digits)
        if operation == "-" and operand > total:
            operation = "+"
        if _apply(total, operation, operand) > MAX_MAGNITUDE:
            operation = "-"
        steps.append(f"{total} {operation} {operand}")
        total = _apply(total, operation, operand)
        expression = f"({expression}) {operation} {operand}" if len(steps) > 1 else steps[0]
    return {"question": f"Compute {expression}.", "answer": str(total), "steps": steps}
