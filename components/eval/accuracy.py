"""Verifiable accuracy of a model on problems with checkable answers, and what test-time
compute buys: greedy accuracy, pass@k, best-of-n and majority vote at several n, the
calculator tool, and self-reflection, each with its generated tokens and inference FLOPs.

One pool of N samples per problem serves pass@k (Chen et al. 2021) and every best-of-n /
majority-vote point (`components.eval.strategies`), so all of them are measured on the same
samples. With a `reward_model` input (a `reward_model` artifact) every sample of the pool is
also scored by it, and best-of-n by reward-model score (`best_reward@n`) is reported beside
the other strategies. A problem whose generation fails is counted in `failed_problems` and the
run goes on.

`max_problems` takes the dataset's first problems; how many were used of how many the file
holds is reported (`problems_used`, `problems_available`, and "12 of 15 problems ... (capped by
max_problems=12)" in the report), never only the cap. `samples.jsonl` holds, per problem, every
sample with its verdict, the calculator run (its text, verdict and each call's expression and
inserted result) and the self-reflection transcript (each attempt, its verdict and the
feedback that followed), so every reported accuracy can be recomputed from it by hand.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.errors import DataError
from components.models.precision import AUTO_HELP, precision_autocast, precision_record
from components.records import count_records

SPEC = ComponentSpec(name="verifiable_accuracy", version="3")  # 3: 95 % intervals, greedy-only, decode sampler, bf16
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
SAMPLES_FILE = "samples.jsonl"
CURVE_FILE = "accuracy_vs_compute.csv"
log = logging.getLogger(__name__)


class AccuracyConfig(StrictConfig):
    format: Literal["gsm8k", "rl"] = Field("gsm8k", description="gsm8k: question/answer; rl: prompt/reference_answer.")
    max_problems: int = Field(32, gt=0)
    samples_per_problem: int = Field(8, ge=0, description="N: the pool pass@k and best-of-n draw from (0: greedy only).")
    ks: list[int] = Field([1, 2, 4, 8], description="pass@k for these k (each <= N; none when N is 0).")
    ns: list[int] = Field([1, 2, 4, 8], description="best-of-n / majority at these n (each <= N; none when N is 0).")
    temperature: float = Field(0.7, gt=0)
    max_new_tokens: int = Field(256, gt=0)
    batch_prompts: int = Field(8, gt=0)
    tool_use: bool = Field(True, description="Also decode greedily with the calculator tool.")
    reflection_rounds: int = Field(2, ge=0, description="Self-reflection rounds after a failed first attempt (0: off).")
    reflection_feedback: Literal["verifier", "self"] = "verifier"
    sampler: Literal["generate", "decode"] = Field(
        "generate", description="generate: transformers' generate, 8 prompts at a time; decode: the batched KV-cache "
                                "sampler (`models.sampling.decode`, fast for Llama-like models), `batch_prompts` at a time.")
    precision: Literal["auto", "fp32", "bf16"] = Field("fp32", description=(
        "bf16: sample under bf16 autocast (weights stay fp32); " + AUTO_HELP))
    seed: int = 0

    @model_validator(mode="after")
    def _within_pool(self) -> "AccuracyConfig":
        for name in ("ks", "ns"):
            if self.samples_per_problem and not getattr(self, name):
                raise ValueError(f"{name} is empty; list at least one value in [1, samples_per_problem]")
            too_big = [v for v in getattr(self, name) if v < 1 or v > self.samples_per_problem]
            if too_big:
                raise ValueError(f"{name} {too_big} must lie in [1, samples_per_problem={self.samples_per_problem}]")
        return self


def score_samples(reward_model_dir: Path, questions: list[str], pools: list[list[Any]], batch_rows: int,
                  context_tokens: int) -> tuple[dict[int, float], float]:
    """The reward model's score of every sample of every pool, keyed by the sample's id(), and
    the reward model's forward FLOPs per token (the cost of scoring, added to best_reward's)."""
    from components.feasibility.model_flops import reward_model_flops_per_token
    from components.models.reward import load_reward_model, score

    model, tokenizer = load_reward_model(reward_model_dir)
    samples = [s for pool in pools for s in pool]
    prompts = [q for q, pool in zip(questions, pools, strict=True) for _ in pool]
    values = score(model, tokenizer, prompts, [s.text for s in samples], batch_rows=batch_rows)
    flops_per_token = reward_model_flops_per_token(model.config, context_tokens, forward_only=True)
    return {id(s): value for s, value in zip(samples, values, strict=True)}, flops_per_token


def problems_used_text(used: int, available: int, max_problems: int, source: str) -> str:
    """"12 of 15 problems from `x.jsonl` (capped by max_problems=12)": what a score was measured on."""
    cap = f" (capped by max_problems={max_problems})" if used < available else ""
    return f"{used} of {available} problems from `{source}`{cap}"


def calculator_runs(model: Any, tokenizer: Any, questions: list[str], max_new_tokens: int
                    ) -> tuple[list[Any], list[str | None]]:
    """Greedy decoding with the calculator per question, and the error of each run that failed
    (counted as a blank, wrong answer; the evaluation goes on)."""
    from components.models.sampling import Sample, sample_with_calculator

    runs, errors = [], []
    for question in questions:
        try:
            runs.append(sample_with_calculator(model, tokenizer, question, max_new_tokens, temperature=0.0))
            errors.append(None)
        except Exception as error:
            log.warning("tool-use decoding failed: %s", error)
            runs.append(Sample(text="", generated_tokens=0, mean_logprob=0.0, finished=False))
            errors.append(f"{type(error).__name__}: {error}")
    return runs, errors


def calculator_record(run: Any, error: str | None, reference: str) -> dict[str, Any]:
    """One problem's calculator run as samples.jsonl stores it: text, verdict and every call."""
    from components.tasks.verifiers import is_correct

    return {"text": run.text, "correct": is_correct(run.text, reference), "generated_tokens": run.generated_tokens,
            "finished": run.finished, "error": error,
            "calls": [{"expression": expression, "result": result} for expression, result in run.calculator_calls]}


def sample_row(question: str, reference: str, pool: list[Any], greedy: Any, rewards: dict[int, float],
               calculator: dict[str, Any] | None) -> dict[str, Any]:
    """A problem's line of samples.jsonl, without its reflection transcript: the pool with each
    sample's verdict (and reward-model score), the greedy answer and the calculator run."""
    from components.tasks.verifiers import is_correct

    samples = [{"text": s.text, "tokens": s.generated_tokens, "mean_logprob": s.mean_logprob,
                **({"reward": rewards[id(s)]} if rewards else {}), "correct": is_correct(s.text, reference)}
               for s in pool]
    return {"question": question, "reference": reference, "greedy": greedy.text if greedy else None,
            "samples": samples, "calculator": calculator}


def _sample_pools(model: Any, tokenizer: Any, questions: list[str], config: AccuracyConfig
                  ) -> tuple[list[list[Any]], list[Any | None], int]:
    """Each problem's pool of N samples and greedy sample ([], None where generation failed), and the failures."""
    from components.models.sampling import Sample, sample, sample_decoded

    draw = sample_decoded if config.sampler == "decode" else sample
    pools: list[list[Sample]] = []
    greedy: list[Sample | None] = []
    failed = 0
    for start in range(0, len(questions), config.batch_prompts):
        batch = questions[start:start + config.batch_prompts]
        try:
            batch_pools = draw(model, tokenizer, batch, n=config.samples_per_problem,
                               max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                               seed=config.seed + start) if config.samples_per_problem else [[] for _ in batch]
            batch_greedy = [s[0] for s in draw(model, tokenizer, batch, n=1, max_new_tokens=config.max_new_tokens,
                                               temperature=0.0, with_logprobs=False)]  # only its text is read
        except Exception as error:  # a failed batch is counted, the evaluation goes on
            log.warning("generation failed for problems %d-%d: %s", start, start + len(batch) - 1, error)
            failed += len(batch)
            batch_pools, batch_greedy = [[] for _ in batch], [None for _ in batch]
        pools += batch_pools  # extended together, after both succeeded: pools[i] is always problem i
        greedy += batch_greedy
    return pools, greedy, failed


def _pool_metrics(config: AccuracyConfig, available: int, failed: int, greedy: list[Any | None], references: list[str],
                  k_pools: list[list[Any]], k_refs: list[str], flops_per_token: float) -> dict[str, Any]:
    """The metrics of the pools themselves: greedy accuracy with its 95 % Wilson interval, and
    (with a pool) sample accuracy and pass@k with pass@1's bootstrap interval (over all problems)."""
    from components.eval.intervals import bootstrap_interval, wilson_interval
    from components.eval.passk import pass_at_k
    from components.tasks.verifiers import is_correct

    problems = len(references)
    greedy_correct = sum(g is not None and is_correct(g.text, r) for g, r in zip(greedy, references))
    low, high = wilson_interval(greedy_correct, problems)
    metrics: dict[str, Any] = {
        "problems_used": problems, "problems_available": available, "failed_problems": failed,
        "greedy_accuracy": greedy_correct / problems, "greedy_accuracy_ci95_low": low, "greedy_accuracy_ci95_high": high}
    if config.samples_per_problem:
        n = config.samples_per_problem
        correct_counts = [sum(is_correct(s.text, r) for s in pool) for pool, r in zip(k_pools, k_refs)]
        per_problem = [c / n for c in correct_counts] + [0.0] * (problems - len(k_pools))  # failed problems score 0
        low, high = bootstrap_interval(per_problem, seed=config.seed)
        metrics.update({"sample_accuracy": sum(correct_counts) / (len(k_pools) * n),
                        **{f"pass@{k}": sum(pass_at_k(n, c, k) for c in correct_counts) / problems for k in config.ks},
                        "pass@1_ci95_low": low, "pass@1_ci95_high": high})
    metrics["inference_flops_per_token"] = flops_per_token
    return metrics


def _strategies_and_rewards(config: AccuracyConfig, paths: dict[str, Path], questions: list[str], kept: list[int],
                            k_pools: list[list[Any]], prompt_lengths: list[int]
                            ) -> tuple[list[str], dict[int, float], float]:
    """The strategies to measure and, with a reward model, each sample's score (by id()) and its FLOPs per token."""
    rewards: dict[int, float] = {}  # id(sample) -> the reward model's score
    reward_flops_per_token = 0.0
    strategies = ["oracle", "majority", "best_logprob"]
    if "reward_model" in paths:
        rewards, reward_flops_per_token = score_samples(
            paths["reward_model"], [questions[i] for i in kept], k_pools, config.batch_prompts,
            max(prompt_lengths) + config.max_new_tokens)
        strategies.append("best_reward")
    return strategies, rewards, reward_flops_per_token


def _strategy_curve(config: AccuracyConfig, strategies: list[str], k_pools: list[list[Any]], k_refs: list[str],
                    k_prompts: list[int], flops_per_token: float, rewards: dict[int, float],
                    reward_flops_per_token: float, problems: int) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """`<strategy>@<n>` accuracy over all problems for every strategy and n, and its curve points."""
    from components.eval.strategies import evaluate_strategy

    accuracies: dict[str, float] = {}
    curve = []
    for strategy in strategies:
        for n in config.ns:
            scorer = (lambda s: rewards[id(s)]) if strategy == "best_reward" else None
            result = evaluate_strategy(strategy, k_pools, k_refs, n, k_prompts, flops_per_token, scorer=scorer)
            inference_flops = result.inference_flops
            if strategy == "best_reward":  # the reward model reads the same prompt + completion tokens once
                inference_flops += result.inference_flops * reward_flops_per_token / flops_per_token
            accuracies[f"{strategy}@{n}"] = result.accuracy * len(k_pools) / problems
            curve.append({"method": strategy, "n": n, "accuracy": accuracies[f"{strategy}@{n}"],
                          "generated_tokens": result.generated_tokens, "inference_flops": inference_flops})
    return accuracies, curve


def _calculator_results(model: Any, tokenizer: Any, questions: list[str], references: list[str],
                        prompt_lengths: list[int], max_new_tokens: int, flops_per_token: float
                        ) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """Greedy decoding with the calculator: each problem's record, the tool metrics and the curve point."""
    from components.tasks.verifiers import is_correct

    problems = len(questions)
    tool, tool_errors = calculator_runs(model, tokenizer, questions, max_new_tokens)
    tool_records = [calculator_record(t, e, r) for t, e, r in zip(tool, tool_errors, references, strict=True)]
    metrics: dict[str, Any] = {}
    if any(tool_errors):
        metrics["failed_tool_problems"] = sum(e is not None for e in tool_errors)
    metrics["tool_accuracy"] = sum(is_correct(t.text, r) for t, r in zip(tool, references)) / problems
    metrics["tool_calls_per_problem"] = sum(t.tool_calls for t in tool) / problems
    tokens = sum(t.generated_tokens for t in tool) / problems
    point = {"method": "greedy+calculator", "n": 1, "accuracy": metrics["tool_accuracy"], "generated_tokens": tokens,
             "inference_flops": (tokens + sum(prompt_lengths) / problems) * flops_per_token}
    return tool_records, metrics, point


def _reflection_results(model: Any, tokenizer: Any, questions: list[str], references: list[str], config: AccuracyConfig,
                        flops_per_token: float) -> tuple[list[Any], dict[str, float], list[dict[str, Any]]]:
    """Self-reflection: each problem's transcript, the accuracy after each round and its curve points."""
    from components.eval.reflection import reflect

    reflection = reflect(model, tokenizer, questions, references, config.reflection_rounds, config.max_new_tokens,
                         feedback=config.reflection_feedback, temperature=config.temperature, seed=config.seed)
    metrics: dict[str, float] = {}
    curve = []
    for r, (acc, gen, pre) in enumerate(zip(reflection.accuracy_by_round, reflection.generated_tokens_by_round,
                                            reflection.prompt_tokens_by_round)):
        metrics[f"reflection_round_{r}"] = acc
        curve.append({"method": f"reflection ({config.reflection_feedback})", "n": r + 1, "accuracy": acc,
                      "generated_tokens": gen, "inference_flops": (gen + pre) * flops_per_token})
    return reflection.transcripts, metrics, curve


def _write_samples(path: Path, config: AccuracyConfig, problems: list[tuple[str, str]], pools: list[list[Any]],
                   greedy: list[Any | None], rewards: dict[int, float], tool_records: list[dict[str, Any] | None],
                   transcripts: list[list[dict[str, Any]] | None]) -> None:
    """samples.jsonl: one line per problem, its samples, greedy answer, calculator run and reflection."""
    with open(path, "w", encoding="utf-8") as handle:
        for index, (question, reference) in enumerate(problems):
            row = sample_row(question, reference, pools[index], greedy[index], rewards, tool_records[index])
            row["reflection"] = None if transcripts[index] is None else {
                "feedback": config.reflection_feedback, "attempts": transcripts[index]}
            handle.write(json.dumps(row) + "\n")


def _write_curve(path: Path, curve: list[dict[str, Any]]) -> None:
    """accuracy_vs_compute.csv: one row per method and n."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["method", "n", "accuracy", "generated_tokens", "inference_flops"])
        writer.writeheader()
        writer.writerows(curve)


def _report_lines(config: AccuracyConfig, used: str, failed: int, metrics: dict[str, Any],
                  curve: list[dict[str, Any]]) -> list[str]:
    """report.md's lines: the setting, the metrics table and the accuracy-vs-compute table."""
    lines = [f"# Verifiable accuracy: {used}", "",
             f"N = {config.samples_per_problem} samples per problem at temperature {config.temperature}, "
             f"up to {config.max_new_tokens} new tokens; {failed} problems failed to generate.", "",
             "| metric | value |", "|---|---:|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    lines += ["", "| method | n | accuracy | generated tokens / problem | inference FLOPs / problem |",
              "|---|---:|---:|---:|---:|"]
    lines += [f"| {c['method']} | {c['n']} | {c['accuracy']:.4f} | {c['generated_tokens']:.0f} | {c['inference_flops']:.3g} |"
              for c in curve]
    return lines


def _build(config: AccuracyConfig, paths: dict[str, Path], out_dir: Path, precision: dict[str, str]
           ) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from components.feasibility.model_flops import inference_flops_per_token
    from components.models.chat import check_context, context_tokens, prompt_ids
    from components.models.factory import load_causal_lm
    from components.tasks.problems import read_problems

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = load_causal_lm(paths["model"]).eval()
    problems = read_problems(paths["dataset"], config.format, config.max_problems)
    available = count_records(paths["dataset"])
    questions = [q for q, _ in problems]
    references = [r for _, r in problems]
    encoded = [prompt_ids(tokenizer, q) for q in questions]
    check_context(encoded, config.max_new_tokens, context_tokens(model.config), str(paths["dataset"]), str(paths["model"]))
    prompt_lengths = [len(ids) for ids in encoded]
    flops_per_token = inference_flops_per_token(model, max(prompt_lengths) + config.max_new_tokens)
    pools, greedy, failed = _sample_pools(model, tokenizer, questions, config)
    kept = [i for i, (pool, first) in enumerate(zip(pools, greedy)) if pool or (first and not config.samples_per_problem)]
    if not kept:
        raise DataError(f"{paths['dataset']}: generation failed for every problem")
    k_pools, k_refs, k_prompts = [pools[i] for i in kept], [references[i] for i in kept], [prompt_lengths[i] for i in kept]
    metrics = _pool_metrics(config, available, failed, greedy, references, k_pools, k_refs, flops_per_token)
    strategies, rewards, reward_flops_per_token = _strategies_and_rewards(config, paths, questions, kept, k_pools,
                                                                          prompt_lengths)
    accuracies, curve = _strategy_curve(config, strategies, k_pools, k_refs, k_prompts, flops_per_token, rewards,
                                        reward_flops_per_token, len(problems))
    metrics.update(accuracies)
    metrics.update(precision)
    tool_records: list[dict[str, Any] | None] = [None] * len(problems)
    if config.tool_use:
        tool_records, tool_metrics, tool_point = _calculator_results(
            model, tokenizer, questions, references, prompt_lengths, config.max_new_tokens, flops_per_token)
        metrics.update(tool_metrics)
        curve.append(tool_point)
    transcripts: list[list[dict[str, Any]] | None] = [None] * len(problems)
    if config.reflection_rounds:
        transcripts, reflection_metrics, reflection_curve = _reflection_results(
            model, tokenizer, questions, references, config, flops_per_token)
        metrics.update(reflection_metrics)
        curve += reflection_curve

    _write_samples(out_dir / SAMPLES_FILE, config, problems, pools, greedy, rewards, tool_records, transcripts)
    _write_curve(out_dir / CURVE_FILE, curve)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    used = problems_used_text(len(problems), available, config.max_problems, paths["dataset"].name)
    lines = _report_lines(config, used, failed, metrics, curve)
    (out_dir / REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return metrics


def evaluate_accuracy(config: AccuracyConfig, model: str, dataset: str, dest: str, overwrite: bool = False,
                      reward_model: str | None = None) -> Manifest:
    """Sample, verify and score `model` on the problems of `dataset` (see the module doc);
    with `reward_model`, also best-of-n by that reward model's score."""
    from components.locks import exclusive  # sampling seeds the process-wide RNG, as training does

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        import torch

        precision = precision_record(config.precision, torch.device("cpu"))
        with exclusive(), precision_autocast("cpu", precision["precision"]):
            return _build(config, paths, out_dir, precision)

    inputs = {"model": model, "dataset": dataset, **({"reward_model": reward_model} if reward_model else {})}
    return produce(SPEC, config, inputs, dest, build, overwrite=overwrite)
