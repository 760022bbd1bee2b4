"""Test-time compute strategies over a pool of samples, scored at equal compute.

Given N samples per problem, the strategy at n <= N is evaluated on the N // n disjoint
groups of n consecutive samples and averaged, so every sample is used once per n and
accuracies at different n come from the same pool:

- `best_of_n` with a score: the verifier itself (oracle: correct if any sample is; equal to
  pass@n on that group), a reward model's score, or the sample's mean token log-prob;
- `majority_vote` over the extracted answers (self-consistency, Wang et al. 2022, "Self-
  Consistency Improves Chain of Thought Reasoning in Language Models", §2): the most frequent
  answer wins, ties go to the answer whose samples have the highest summed log-prob;
  samples without an answer do not vote.

Compute is counted in generated tokens and inference FLOPs: each sample costs its prompt's
prefill plus its generated tokens at the estimator's forward FLOPs per token (2N + attention,
`components.feasibility.flops.forward_flops_per_token`), so strategies compare at equal FLOPs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from components.errors import ConfigError
from components.models.sampling import Sample
from components.tasks.verifiers import answer_value, is_correct, reference_value

Scorer = Callable[[Sample], float]


@dataclass(frozen=True)
class StrategyResult:
    strategy: str
    n: int
    accuracy: float
    problems: int
    generated_tokens: float  # per problem, mean
    inference_flops: float  # per problem, mean


def majority_answer(group: Sequence[Sample]):  # noqa: ANN201 - Fraction | None
    """The most frequent extracted answer of a group (ties: highest summed log-prob)."""
    votes: Counter = Counter()
    weight: dict = {}
    for sample in group:
        value = answer_value(sample.text)
        if value is None:
            continue
        votes[value] += 1
        weight[value] = weight.get(value, 0.0) + sample.mean_logprob * sample.generated_tokens
    if not votes:
        return None
    return max(votes, key=lambda value: (votes[value], weight[value]))


def _groups(samples: Sequence[Sample], n: int) -> list[Sequence[Sample]]:
    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if n > len(samples):
        raise ConfigError(f"n={n} exceeds the {len(samples)} samples per problem")
    return [samples[start:start + n] for start in range(0, len(samples) - n + 1, n)]


def evaluate_strategy(
    strategy: str, samples_per_problem: Sequence[Sequence[Sample]], references: Sequence[str], n: int,
    prompt_tokens: Sequence[int], flops_per_token: float, scorer: Scorer | None = None,
) -> StrategyResult:
    """Accuracy and compute of `strategy` ("oracle", "majority", "best_logprob", "best_reward",
    "single") at group size n, averaged over problems and groups."""
    if len(samples_per_problem) != len(references) or len(references) != len(prompt_tokens):
        raise ConfigError("samples, references and prompt lengths must cover the same problems")
    if not references:
        raise ConfigError("no problems to evaluate")
    correct = tokens = flops = 0.0
    for samples, reference, prompt in zip(samples_per_problem, references, prompt_tokens, strict=True):
        groups = _groups(samples, n)
        for group in groups:
            if strategy == "oracle":
                hit = any(is_correct(s.text, reference) for s in group)
            elif strategy == "majority":
                hit = majority_answer(group) == reference_value(reference)
            elif strategy in ("best_logprob", "best_reward"):
                score = scorer if strategy == "best_reward" else (lambda s: s.mean_logprob)
                if score is None:
                    raise ConfigError("best_reward needs a reward-model scorer")
                hit = is_correct(max(group, key=score).text, reference)
            elif strategy == "single":
                hit = is_correct(group[0].text, reference)
            else:
                raise ConfigError(f"unknown strategy {strategy!r}")
            generated = sum(s.generated_tokens for s in group)
            correct += hit / len(groups)
            tokens += generated / len(groups)
            flops += (generated + prompt * len(group)) * flops_per_token / len(groups)
    problems = len(references)
    return StrategyResult(strategy=strategy, n=n, accuracy=correct / problems, problems=problems,
                          generated_tokens=tokens / problems, inference_flops=flops / problems)
