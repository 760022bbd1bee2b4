"""The calculator of GSM8K (Cobbe et al. 2021, §4.1 "calculator annotations"): when a model
writes `<<48/2=`, generation pauses, the expression is evaluated, the result and `>>` are
inserted, and generation resumes.

The evaluator walks the expression's syntax tree and accepts only numbers, + - * / (also
written x, × and ÷), unary signs and parentheses. Everything else -- names, calls, attribute
access, subscripts, powers, comparisons -- is refused; Python's `eval` is never used. Sizes
are bounded (expression length, nesting, magnitude), so no input can make it slow or huge.
"""

from __future__ import annotations

import ast
import math
import re
from fractions import Fraction

from components.errors import CrucibleError

MAX_EXPRESSION_CHARS = 200
MAX_DEPTH = 32
MAX_MAGNITUDE = 10**15
CALL_OPEN, CALL_RESULT, CALL_CLOSE = "<<", "=", ">>"

_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b}
_UNARY = {ast.UAdd: lambda a: a, ast.USub: lambda a: -a}
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}\b)")


class CalculatorError(CrucibleError):
    """The expression is not plain arithmetic, or its value is undefined or too large."""


def _value(node: ast.AST, depth: int) -> Fraction:
    if depth > MAX_DEPTH:
        raise CalculatorError(f"expression nested deeper than {MAX_DEPTH}")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float) and not math.isfinite(node.value):
            raise CalculatorError(f"not a finite number: {node.value}")
        if abs(node.value) > MAX_MAGNITUDE:
            raise CalculatorError(f"number exceeds {MAX_MAGNITUDE:.0e}")
        return Fraction(repr(node.value))  # "0.1" exactly, not the binary float nearest to it
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left, depth + 1), _value(node.right, depth + 1)
        if isinstance(node.op, ast.Div) and right == 0:
            raise CalculatorError("division by zero")
        result = _BINARY[type(node.op)](left, right)
    elif isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        result = _UNARY[type(node.op)](_value(node.operand, depth + 1))
    else:
        raise CalculatorError(f"not arithmetic: {type(node).__name__} is not allowed (only numbers, + - * / and parentheses)")
    if abs(result) > MAX_MAGNITUDE:
        raise CalculatorError(f"result exceeds {MAX_MAGNITUDE:.0e}")
    return result


def evaluate_arithmetic(expression: str) -> Fraction:
    """The exact value of an arithmetic expression, or CalculatorError."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    text = _THOUSANDS.sub("", expression.replace("×", "*").replace("÷", "/").replace("$", ""))
    text = re.sub(r"(?<=[\d)\s])[xX](?=[\s\d(])", "*", text).strip()
    if not text:
        raise CalculatorError("empty expression")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise CalculatorError(f"not arithmetic: {expression!r} does not parse") from None
    return _value(tree.body, 0)


def format_number(value: Fraction) -> str:
    """As GSM8K writes results: an integer, else a decimal rounded to 6 places ("2.5")."""
    if value.denominator == 1:
        return str(value.numerator)
    return f"{float(value):.6f}".rstrip("0").rstrip(".")


def pending_call(text: str) -> str | None:
    """The expression of a calculator call the text has just opened and not closed
    (`... <<48/2=` -> "48/2"), else None."""
    if not text.endswith(CALL_RESULT):
        return None
    start = text.rfind(CALL_OPEN)
    if start < 0 or CALL_CLOSE in text[start:]:
        return None
    expression = text[start + len(CALL_OPEN):-len(CALL_RESULT)]
    return expression if CALL_RESULT not in expression else None


def complete_call(text: str) -> str | None:
    """The text to insert after a pending call ("24>>"), or None when there is none or the
    expression is refused (the model then continues on its own)."""
    expression = pending_call(text)
    if expression is None:
        return None
    try:
        return format_number(evaluate_arithmetic(expression)) + CALL_CLOSE
    except CalculatorError:
        return None
