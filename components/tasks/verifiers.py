"""Verifiable answers: extract the final answer of a completion and compare it with a reference.

`extract_answer(text)` returns the final answer as a canonical number string ("18", "0.5",
"-3", "1/3"), or None when the text has no number. It looks, in order, for the last
`#### N` (GSM8K's marker), the last `\\boxed{N}`, the last "the answer is N" / "answer: N" /
"A: N", and otherwise the last number in the text: a model's final answer comes last, the
first number of a worked solution is usually an intermediate value.

Numbers are read with currency signs, thousands separators, units and trailing punctuation
removed ("$1,234.50." -> 1234.5, "18 dollars" -> 18, "50%" -> 50), leading-dot decimals
(".50" -> 0.5) and fractions ("1/2" -> 0.5), and compared exactly as rationals, so "0.5",
".50" and "1/2" are the same answer. `is_correct(completion, reference)` takes a GSM8K answer
string ("... #### 18") or a bare number as the reference; a reference without an answer is a
DataError (a bad benchmark row, not a wrong model).
"""

from __future__ import annotations

import re
from fractions import Fraction

from components.errors import DataError

_FRACTION = re.compile(r"([-−]?\s*\d+)\s*/\s*(\d+)(?![\d.])")
_NUMBER_RE = re.compile(r"(?<![\w.])[-−]?\s*\$?\s*(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_MARKERS = [
    re.compile(r"####\s*(.+)"),
    re.compile(r"\\boxed\s*\{([^{}]*)\}"),
    re.compile(r"(?:the\s+)?(?:final\s+)?answer\s*(?:is|:|=)\s*:?\s*(.+)", re.IGNORECASE),
    re.compile(r"(?:^|\n)\s*A\s*:\s*(.+)"),
]


def _parse_number(token: str) -> Fraction | None:
    cleaned = token.replace("−", "-").replace("$", "").replace(",", "").replace(" ", "")
    if not cleaned or cleaned in {"-", "."}:
        return None
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def _numbers(text: str) -> list[tuple[int, Fraction]]:
    """Every number of `text` as (position, value) in order; a fraction "3/4" is one number."""
    found = []
    for match in _FRACTION.finditer(text):
        if int(match.group(2)):
            found.append((match.start(), match.end(),
                          Fraction(int(match.group(1).replace("−", "-").replace(" ", "")), int(match.group(2)))))
    fractions = [(start, end) for start, end, _ in found]
    for match in _NUMBER_RE.finditer(text):
        value = _parse_number(match.group(0))
        if value is not None and not any(start <= match.start() < end for start, end in fractions):
            found.append((match.start(), match.end(), value))
    return sorted((start, value) for start, _, value in found)


def _first_number(segment: str) -> Fraction | None:
    """The first number in a short answer segment ("$18.", "1/2 of a cake", "-3 degrees"); in
    a worked segment ("3 + 4 = 7 apples") the result after the last "=" of its first line."""
    first_line = segment.strip().split("\n", 1)[0]
    if "=" in first_line:
        segment = first_line.rsplit("=", 1)[1]
    numbers = _numbers(segment)
    return numbers[0][1] if numbers else None


def _last_number(text: str) -> Fraction | None:
    numbers = _numbers(text)
    return numbers[-1][1] if numbers else None


def _canonical(value: Fraction) -> str:
    """"18", "-3", "0.5", "1234.5"; a non-terminating decimal stays a fraction ("1/3")."""
    if value.denominator == 1:
        return str(value.numerator)
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator != 1:
        return f"{value.numerator}/{value.denominator}"
    text = f"{float(value):.12f}".rstrip("0").rstrip(".")
    return text


def answer_value(text: str) -> Fraction | None:
    """The final answer of `text` as an exact rational, or None."""
    if not isinstance(text, str) or not text.strip():
        return None
    for marker in _MARKERS:
        matches = list(marker.finditer(text))
        for match in reversed(matches):  # the last marked answer wins
            value = _first_number(match.group(1))
            if value is not None:
                return value
    return _last_number(text)


def extract_answer(text: str) -> str | None:
    """The final answer of a completion as a canonical number string, or None (see module doc)."""
    value = answer_value(text)
    return None if value is None else _canonical(value)


def reference_value(reference: str) -> Fraction:
    """The answer of a reference: the number after GSM8K's last '####', or a bare number."""
    if not isinstance(reference, str) or not reference.strip():
        raise DataError(f"reference {reference!r} has no answer")
    _, marker, tail = reference.rpartition("####")
    value = _first_number(tail) if marker else _first_number(reference.strip()) if _is_bare_number(reference) else None
    if value is None:
        raise DataError(f"reference {reference[:80]!r} has no answer (expected '... #### N' or a number)")
    return value


def _is_bare_number(text: str) -> bool:
    stripped = text.strip().rstrip(".")
    return bool(re.fullmatch(r"[-−]?\s*\$?\s*[\d,]*\.?\d+(?:\s*/\s*\d+)?", stripped))


def is_correct(completion: str, reference: str) -> bool:
    """True when the completion's final answer equals the reference's, as exact rationals.

    An empty completion or one without a number is incorrect; a reference without an answer
    raises DataError.
    """
    expected = reference_value(reference)
    value = answer_value(completion)
    return value is not None and value == expected
