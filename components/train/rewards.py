"""Reward functions for RL with verifiable rewards: plain Python callables.

A reward function takes `(completion, reference)` (the sampled text and the problem's
reference answer, a GSM8K `... #### N` string or a bare number) and returns a float.
Built-ins are named in configs (`correctness`, `format`, `calculation`); any other function is named as
`package.module:function`. A function that raises or returns NaN/inf gives that sample
reward 0 and is counted (`on_error: zero`), or stops the run with the function, the sample
and the error (`on_error: stop`): never a silent wrong gradient. Counted failures are logged
each step with an example, and a step where one function failed on at least
`max_error_fraction` of its samples stops the run (`check_errors`; default 1.0: a function
that failed on every sample of a step is broken, not noisy). A user function's module file is
hashed into the trainer's cache key (`RewardSpec.code_references`), so editing it reruns.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Literal

from pydantic import Field

from components.config import StrictConfig
from components.errors import CrucibleError
from components.tasks.calculator import CalculatorError, evaluate_arithmetic
from components.tasks.verifiers import answer_value, is_correct

log = logging.getLogger(__name__)
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

    def code_references(self) -> list[str]:
        """A user function (not a built-in, whose code the component version covers)."""
        return [] if self.function in BUILT_IN else [self.function]


class RewardError(CrucibleError):
    """A reward function failed and the run is configured to stop on it."""


def resolve(name: str) -> RewardFunction:
    if name in BUILT_IN:
        return BUILT_IN[name]
    if ":" not in name:
        raise CrucibleError(f"reward function {name!r}: not a built-in ({sorted(BUILT_IN)}) nor 'module:function'")
    module_name, function_name = name.split(":", 1)
    try:
        function = getattr(_current_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise CrucibleError(f"reward function {name!r}: cannot import it ({error})") from error
    if not callable(function):
        raise CrucibleError(f"reward function {name!r} is not callable")
    return function


_IMPORTED_SOURCE: dict[str, str] = {}  # module name -> sha256 of the source file it was (re)loaded from


def _current_module(module_name: str) -> ModuleType:
    """The module as its file is now: a module edited since this process imported it is
    reloaded, so a run in a long-lived process (a Prefect worker, a notebook) uses the code
    whose hash is in its cache key (`StrictConfig.code_fingerprints`)."""
    module = importlib.import_module(module_name)
    source = getattr(module, "__file__", None)
    if not source or not Path(source).is_file():
        return module
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    if _IMPORTED_SOURCE.setdefault(module_name, digest) != digest:
        module = importlib.reload(module)
        _IMPORTED_SOURCE[module_name] = digest
    return module


@dataclass
class Scores:
    total: list[float]  # weighted sum per sample
    per_function: dict[str, list[float]]
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    errors_per_function: dict[str, int] = field(default_factory=dict)
    samples: int = 0

    def merge(self, other: Scores) -> Scores:
        """This step's scores and another rollout round's (GRPO's refills), for the error check."""
        return Scores(total=self.total + other.total,
                      per_function={k: v + other.per_function.get(k, []) for k, v in self.per_function.items()},
                      errors=self.errors + other.errors,
                      error_examples=(self.error_examples + other.error_examples)[:3],
                      errors_per_function={k: v + other.errors_per_function.get(k, 0)
                                           for k, v in self.errors_per_function.items()},
                      samples=self.samples + other.samples)


def score(specs: Sequence[RewardSpec], completions: Sequence[str], references: Sequence[str],
          on_error: Literal["zero", "stop"] = "zero") -> Scores:
    """Every reward function on every sample; the total is the weighted sum."""
    functions = [(spec, resolve(spec.function)) for spec in specs]
    result = Scores(total=[0.0] * len(completions), per_function={spec.function: [] for spec in specs},
                    errors_per_function={spec.function: 0 for spec in specs}, samples=len(completions))
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
                result.errors_per_function[spec.function] += 1
                if len(result.error_examples) < 3:
                    result.error_examples.append(message)
                value = 0.0
            result.per_function[spec.function].append(value)
            result.total[index] += spec.weight * value
    return result


def check_errors(scores: Scores, trainer: str, step: int, max_error_fraction: float) -> None:
    """Log a step's reward failures (count per function and the first example), and stop the
    run (RewardError, nothing published) when one function failed on at least
    `max_error_fraction` of the step's samples (0: on any failure; 1: only when it failed on
    every sample). A failed sample is rewarded 0, so past that bound the gradient follows the
    failures, not the task."""
    failing = {name: count for name, count in scores.errors_per_function.items() if count}
    if not failing:
        return
    counts = ", ".join(f"{name!r} failed on {count} of {scores.samples} samples" for name, count in failing.items())
    example = scores.error_examples[0] if scores.error_examples else ""
    log.warning("%s step %d: reward %s; first: %s", trainer, step, counts, example)
    for name, count in failing.items():
        if count / max(1, scores.samples) >= max_error_fraction:
            examples = [e for e in scores.error_examples if e.startswith(f"reward function {name!r}")]
            raise RewardError(
                f"{trainer} step {step}: reward function {name!r} failed on {count} of {scores.samples} samples, "
                f"at or above max_reward_error_fraction={max_error_fraction:g}; stopped, nothing published. "
                f"First: {(examples or [example])[0]}")
