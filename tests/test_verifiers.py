"""The answer verifier and pass@k: GSM8K references, every answer format, brute force."""

from __future__ import annotations

import itertools
import json

import pytest

from components.errors import ConfigError, DataError
from components.eval.passk import mean_pass_at_k, pass_at_k
from components.tasks.verifiers import extract_answer, is_correct
from tests.conftest import REPO_ROOT


def test_every_gsm8k_test_reference_scores_itself_correct() -> None:
    rows = [json.loads(line) for line in (REPO_ROOT / "data/raw/gsm8k/test.jsonl").read_text().splitlines()]
    assert len(rows) == 1319
    assert all(is_correct(row["answer"], row["answer"]) for row in rows)
    assert sum(is_correct(row["answer"], rows[(i + 1) % len(rows)]["answer"]) for i, row in enumerate(rows)) < 60


@pytest.mark.parametrize(("completion", "expected"), [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
    ("#### 1,200", "1200"),
    ("The answer is 42.", "42"),
    ("So the final answer is: -7 degrees", "-7"),
    ("A: 9", "9"),
    (r"Therefore $\boxed{18}$.", "18"),
    (r"\boxed{3/4}", "0.75"),
    ("It costs $1,234.50.", "1234.5"),
    ("She earns 18 dollars per day", "18"),
    (".50", "0.5"),
    ("1/2", "0.5"),
    ("0.5", "0.5"),
    ("1/3 of the pie", "1/3"),
    ("It rose by 50%.", "50"),
    ("First 5, then 10, then 15", "15"),  # the final number, not the first
    ("Answer: 7, not 4", "7"),
    ("The answer is 3 + 4 = 7", "7"),
    ("no number at all", None),
    ("", None),
])
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


@pytest.mark.parametrize(("completion", "reference", "correct"), [
    ("The answer is 0.5", "... #### 1/2", True),
    (".50", "0.5", True),
    ("1/2", "so #### 0.5", True),
    ("$18.00", "#### 18", True),
    ("#### 3,600", "#### 3600", True),
    ("#### 17", "#### 18", False),
    ("", "#### 18", False),
    ("I don't know", "#### 18", False),
    ("-3", "#### -3", True),
])
def test_is_correct(completion: str, reference: str, correct: bool) -> None:
    assert is_correct(completion, reference) is correct


@pytest.mark.parametrize("reference", ["", "no answer here", "#### unknown"])
def test_a_reference_without_an_answer_is_a_clear_error(reference: str) -> None:
    with pytest.raises(DataError, match="has no answer"):
        is_correct("#### 1", reference)


def test_pass_at_k_matches_brute_force_enumeration() -> None:
    for n in range(1, 8):
        for c in range(n + 1):
            samples = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(samples, k))
                brute = sum(any(subset) for subset in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)  # stable where C(200, 100) would overflow floats
    assert mean_pass_at_k([0, 2, 4], n=4, ks=[1, 4]) == pytest.approx({1: 0.5, 4: 2 / 3})


@pytest.mark.parametrize(("n", "c", "k", "message"), [
    (0, 0, 1, "at least one sample"), (4, 5, 1, "must lie in"), (4, 1, 5, "k=5 must lie in"), (4, 1, 0, "k=0"),
])
def test_pass_at_k_rejects_impossible_inputs(n: int, c: int, k: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        pass_at_k(n, c, k)
