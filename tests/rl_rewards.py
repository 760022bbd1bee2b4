"""Reward functions the RL tests name as `tests.rl_rewards:<function>` (user functions)."""

from __future__ import annotations

import os
from pathlib import Path


def digit_fraction(completion: str, reference: str) -> float:
    """A dense, easily learnt reward: the share of the completion's characters that are digits."""
    return sum(c.isdigit() for c in completion) / max(1, len(completion))


def constant(completion: str, reference: str) -> float:
    return 1.0


def raises(completion: str, reference: str) -> float:
    raise RuntimeError("reward service unavailable")


_calls = {"raises_every_other": 0}


def raises_every_other(completion: str, reference: str) -> float:
    """digit_fraction on even calls, a failure on odd ones: half of every batch fails."""
    _calls["raises_every_other"] += 1
    if _calls["raises_every_other"] % 2:
        raise RuntimeError("flaky reward service")
    return digit_fraction(completion, reference)


def records_calls(completion: str, reference: str) -> float:
    """digit_fraction, appending each call's completion to the file $CRUCIBLE_TEST_REWARD_LOG."""
    with open(os.environ["CRUCIBLE_TEST_REWARD_LOG"], "a", encoding="utf-8") as log:
        log.write(repr(completion) + "\n")
    return digit_fraction(completion, reference)


def not_a_number(completion: str, reference: str) -> float:
    return float("nan")


def dies_after_calls(completion: str, reference: str) -> float:
    """digit_fraction, but kills the process (SIGKILL, as an OOM killer would) at call number
    $CRUCIBLE_TEST_DIE_AT, counting calls in the file $CRUCIBLE_TEST_CALLS."""
    counter = Path(os.environ["CRUCIBLE_TEST_CALLS"])
    calls = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(calls))
    if calls == int(os.environ.get("CRUCIBLE_TEST_DIE_AT", "0")):
        os.kill(os.getpid(), 9)
    return digit_fraction(completion, reference)
