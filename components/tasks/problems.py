"""Problem sets a model is scored on: (question, reference answer) pairs read from a file,
every reference checked to be scoreable before any generation starts.

Formats: `gsm8k` (fields `question` and `answer`, the answer's number after `####`; Cobbe et
al. 2021, "Training Verifiers to Solve Math Word Problems") and `rl` (fields
`prompt` and `reference_answer`, as the arithmetic task writes them).
"""

from __future__ import annotations

import re
from pathlib import Path

from components.errors import DataError
from components.records import iter_records
from components.tasks.verifiers import reference_value

_FINAL_MARKER = "####"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def gsm8k_final_answer(answer: str, where: str = "gsm8k answer") -> str:
    """The number after the last '####' with thousands separators removed ("1,200" -> "1200").

    Commas are dropped so the reference compares equal to a model's answer however it
    groups digits; anything that is then not a plain number is rejected rather than stored
    as an unscoreable reference.
    """
    _, marker, tail = answer.rpartition(_FINAL_MARKER)
    if not marker:
        raise DataError(f"{where}: no '{_FINAL_MARKER}' final-answer marker")
    value = tail.strip().replace(",", "")
    if not _NUMBER.fullmatch(value):
        raise DataError(f"{where}: final answer {tail.strip()!r} after '{_FINAL_MARKER}' is not a number")
    return value


def read_problems(path: Path, fmt: str, limit: int) -> list[tuple[str, str]]:
    """(question, reference) pairs; a row without the format's fields or answer is named."""
    fields = ("question", "answer") if fmt == "gsm8k" else ("prompt", "reference_answer")
    problems = []
    for line, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        missing = [f for f in fields if not isinstance(record.get(f), str)]
        if missing:
            raise DataError(f"{path}:{line}: missing column(s) {missing} (record has {sorted(record)})")
        question, reference = record[fields[0]], record[fields[1]]
        if fmt == "gsm8k":
            gsm8k_final_answer(reference, f"{path}:{line}: field 'answer'")
        try:
            reference_value(reference)  # checked before any generation, not after
        except DataError as error:
            raise DataError(f"{path}:{line}: {error}") from None
        problems.append((question, reference))
        if len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"{path}: no problems (the dataset is empty)")
    return problems
