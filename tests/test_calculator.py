"""The GSM8K calculator: arithmetic only, exact, bounded; never Python's eval."""

from __future__ import annotations

from fractions import Fraction

import pytest

from components.tasks.calculator import (
    CalculatorError, complete_call, evaluate_arithmetic, format_number, pending_call,
)


@pytest.mark.parametrize(("expression", "value"), [
    ("48/2", 24), ("48+24", 72), ("2*(3+4)", 14), ("-5+2", -3), ("10/4", Fraction(5, 2)),
    ("1,000*3", 3000), ("3 x 4", 12), ("6÷4", Fraction(3, 2)), ("2×3", 6), ("0.1+0.2", Fraction(3, 10)),
])
def test_arithmetic_is_exact(expression: str, value) -> None:
    assert evaluate_arithmetic(expression) == value


@pytest.mark.parametrize("expression", [
    "__import__('os').system('true')", "().__class__", "a+1", "open('x')", "2**10", "9**9**9", "10**100",
    "[1,2]", "1 if 1 else 2", "1<2", "lambda: 1", "'abc'", "x.y", "a[0]", "", "1/0", "-(" * 40 + "1" + ")" * 40,
    "9" * 16 + "*10", "1" * 300, "1e999", "1e300/1e290",
])
def test_anything_but_arithmetic_is_refused(expression: str) -> None:
    with pytest.raises(CalculatorError):
        evaluate_arithmetic(expression)


def test_calls_pause_at_the_equals_sign_and_insert_the_result() -> None:
    text = "Natalia sold 48/2 = <<48/2="
    assert pending_call(text) == "48/2" and complete_call(text) == "24>>"
    assert pending_call("She has <<48/2=24>>24 clips.") is None
    assert pending_call("5 = ") is None  # no open call
    assert complete_call("<<import os=") is None  # refused: the model continues on its own
    assert complete_call("costs <<10/4=") == "2.5>>"
    assert format_number(Fraction(1, 3)) == "0.333333"
