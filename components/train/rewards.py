"""Reward functions for RL with verifiable rewards: plain Python callables.

A reward function takes `(completion, reference)` (the sampled text and the problem's
reference answer, a GSM8K `... #### N` string or a bare number) and returns a float.
Built-ins are named in configs (`correctness`, `format`, `calculation`); any other function is named as
`package.module:function`. A function that raises or returns NaN/inf gives that sample
reward 0 and is counted (`on_error: zero`), or stops the run with the function, the sample
and the error (`on_error: stop`): never a silent wrong gradient.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field

from components.config import StrictConfig
from components.errors import CrucibleError
from components.eval.verifiers import is_correct

RewardFunction = Callable[[str, str], float]
_FINAL_ANSWER = re.compile(r"####\s*-?[\d,]*\.?\d+\s*$")
_ANNOTATION = re.compile(r"<<([^=<>]*)=([^<>]*)>>")


def correctness(completion: str, reference: str) -> float:
    """1 when the completion's final answer equals the reference's (the evaluators' verifier), else 0."""
    return 1.0 if is_correct(completion, reference) else 0.0


def answer_format(completion: str, reference: str) -> float:
    """1 when the completion ends with a GSM8K-style final answer line `#### N`, else 0."""
    return 1.0 if _FINAL_ANSWER.search(completion.strip()) else 0.0


def calculation(completion: str, reference: str) -> float:
    """The share of the completion's calculator annotations `<<expr=value>>` whose value is the
    expression's (checked by the evaluators' AST calculator; 0 when there is none): a
    verifiable per-step signal (a process reward in the sense of Lightman et al. 2023, "Let's
    Verify Step by Step", computed by a checker instead of a learned model)."""
    from components.eval.calculator import CalculatorError, evaluate_arithmetic
    from components.eval.verifiers import answer_value

    annotations = _ANNOTATION.findall(completion)
    if not annotations:
        return 0.0
    right = 0
    for expression, value in annotations:
        try:
            right += evaluate_arithmetic(expression) == answer_value(value)
        except CalculatorError:
            pass
    return right / len(annotations)


BUILT_IN: dict[str, RewardFunction] = {"correctness": correctness, "format": answer_format, "calculation": calculation}


class RewardSpec(StrictConfig):
    function: str = Field(description="A built-in (correctness, format, calculation) or 'package.module:function'.")
    weight: float = 1.0


class RewardError(CrucibleError):
    """A reward function failed and the run is configured to stop on it."""


def resolve(name: str) -> RewardFunction:
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise CrucibleError(f"reward function {name!r}: not a built-in ({sorted(BUILT_IN)}) nor 'module:function'")
    module_name, function_name = name.split(":", 1)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise CrucibleError(f"reward function {name!r}: cannot import it ({error})") from error
    if not callable(function):
        raise CrucibleError(f"reward function {name!r} is not callable")
    return function


@dataclass
class Scores:
    total: list[float]  # weighted sum per sample
    per_function: dict[str, list[float]]
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)


def score(specs: Sequence[RewardSpec], completions: Sequence[str], references: Sequence[str],
          on_error: Literal["zero", "stop"] = "zero") -> Scores:
    """Every reward function on every sample; the total is the weighted sum."""
    functions = [(spec, resolve(spec.function)) for spec in specs]
    result = Scores(total=[0.0] * len(completions), per_function={spec.function: [] for spec in specs})
    for index, (completion, reference) in enumerate(zip(completions, references)):
        for spec, function in functions:
            try:
                value = float(function(completion, reference))
                if not math.isfinite(value):
                    raise ValueError(f"returned {value}")
            except Exception as error:  # noqa: BLE001 - a user function may raise anything
                message = f"reward function {spec.function!r} on sample {index} ({completion[:60]!r}): {error}"
                if on_error == "stop":
                    raise RewardError(message) from error
                result.errors += 1
                if len(result.error_examples) < 3:
                    result.error_examples.append(message)
                value = 0.0
            result.per_function[spec.function].append(value)
            result.total[index] += spec.weight * value
    return result
