"""What the online RL trainers (GRPO, PPO) share: the policy and problems they start from,
held-out accuracy, and the RL loop.

Rollouts come from `components.models.sampling.decode` and log-probs from
`components.models.logprobs.completion_logprobs`. `run_rl` drives the same `Run` as the
supervised loop (`components.train.run`: seeding, resume, learning-rate schedule, divergence
check, metrics, checkpoints, finishing); each step is the algorithm's rollout then updates,
and held-out scoring is the run's evaluation hook. RL trainers run in one process on one
device (no DeepSpeed launch yet).
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.errors import ConfigError, DataError
from components.feasibility.model_flops import inference_flops_per_token, training_flops_per_token
from components.locks import exclusive
from components.runlog import (
    PUBLISHED_STEP_CSV_FILE, PUBLISHED_STEP_LOG_FILE, STEP_LOG_FILE, TRAIN_REPORT_FILE, append_record, metrics_table,
    read_metrics, write_csv, write_records,
)
from components.models.chat import check_context, context_tokens, prompt_ids
from components.models.factory import load_causal_lm
from components.models.sampling import decode
from components.tasks.problems import read_problems
from components.tasks.verifiers import is_correct
from components.train.backends import TorchBackend, local_backend
from components.train.batches import EpochSampler
from components.train.config import TrainConfig
from components.train.launch import produce_trained
from components.train.run import Evaluation, Run, StatefulStep

if TYPE_CHECKING:
    import torch

HELDOUT_FILE = "heldout_accuracy.jsonl"
RL_CSV_COLUMNS = ("step", "loss", "reward_mean", "reward_std", "kl", "entropy", "clip_fraction_low",
                  "clip_fraction_high", "zero_variance_fraction", "response_length", "rollout_time_s",
                  "update_time_s", "grad_norm", "learning_rate")


class HeldoutSettings(StrictConfig):
    problems: int = Field(100, ge=0, description="Held-out problems scored (0: none).")
    samples: int = Field(4, ge=0, description="Also sample this many completions per problem at the rollout "
                                              "temperature: their accuracy is the held-out pass@1 (0: greedy only).")
    every_steps: int = Field(0, ge=0, description="Also score every k steps (0: only before and after).")
    batch_prompts: int = Field(50, gt=0)


def verified_accuracy(model: Any, tokenizer: Any, problems: list[tuple[str, str]], max_new_tokens: int,
                      batch_prompts: int, samples: int = 1, temperature: float = 0.0) -> float:
    """Fraction of completions of `problems` the verifier accepts: greedy (temperature 0, one
    per problem) or `samples` sampled per problem (their mean is pass@1)."""
    correct = 0
    for start in range(0, len(problems), batch_prompts):
        batch = problems[start:start + batch_prompts]
        rollout = decode(model, tokenizer, [prompt_ids(tokenizer, q) for q, _ in batch], samples, max_new_tokens,
                         temperature)
        correct += sum(is_correct(text, batch[row // samples][1]) for row, text in enumerate(rollout.texts))
    return correct / max(1, len(problems) * samples)


@dataclass
class RLSetup:
    """What every RL job starts from: the policy (fp32 master weights) and its tokenizer, the
    training and held-out problems, the prompts' token ids, and FLOPs per token for accounting."""

    tokenizer: Any
    policy: Any
    problems: list[tuple[str, str]]
    heldout: list[tuple[str, str]]
    encoded: list[list[int]]
    forward_flops_per_token: float
    training_flops_per_token: float


def load_rl_setup(paths: dict[str, Path], config: Any) -> RLSetup:
    """The policy from `paths["model"]`, problems from `paths["problems"]` (and `heldout`), as
    `config` (a GRPO or PPO config) asks; a tokenizer without padding or too few problems is named."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{paths['model']}: the tokenizer has no pad token")
    policy = load_causal_lm(paths["model"], dtype=torch.float32)
    problems = read_problems(paths["problems"], config.problems_format, config.max_problems)
    heldout = (read_problems(paths["heldout"], config.problems_format, config.heldout.problems)
               if "heldout" in paths and config.heldout.problems else [])
    if len(problems) < config.train.batch_size_rows:
        raise DataError(f"{paths['problems']}: {len(problems)} problems, fewer than batch_size_rows "
                        f"({config.train.batch_size_rows})")
    encoded = [prompt_ids(tokenizer, question) for question, _ in problems]
    check_context(encoded, config.max_new_tokens, context_tokens(policy.config), str(paths["problems"]), str(paths["model"]))
    context = max(len(ids) for ids in encoded) + config.max_new_tokens
    return RLSetup(tokenizer, policy, problems, heldout, encoded, inference_flops_per_token(policy, context),
                   training_flops_per_token(policy, context))


class StepFunction(StatefulStep, Protocol):
    """One RL step: given the prompts' indices, do the rollout and updates; return the step record."""

    def __call__(self, step_index: int, indices: torch.Tensor, learning_rate: float) -> dict[str, Any]: ...


class RunningTotals:
    """An RL step's totals over the whole run: reward failures and training FLOPs (rollouts
    included). A checkpoint saves them and a resume restores them (`Run.keep_step_state`), so a
    resumed run's step records and manifest count every step, not only those since the resume."""

    reward_errors: int = 0
    training_flops: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """The totals as JSON numbers."""
        return {"reward_errors": self.reward_errors, "training_flops": self.training_flops}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The totals a checkpoint saved; `{}` (a fresh run, or a checkpoint from before step states) is zero."""
        self.reward_errors = int(state.get("reward_errors", 0))
        self.training_flops = float(state.get("training_flops", 0.0))


def step_grad_norm(norms: list[float]) -> float | None:
    """The gradient norm a step of several updates reports: the first non-finite one, else the
    largest. Python's `max` is no guard (`max([1.0, nan])` is 1.0), and a NaN hidden here would
    let `run_rl` publish a run whose later updates were silently skipped."""
    non_finite = [norm for norm in norms if not math.isfinite(norm)]
    return non_finite[0] if non_finite else max(norms, default=None)


@dataclass(frozen=True)
class HeldoutScorer:
    """Held-out accuracy of `policy` at a step, appended to `path` (once per step): greedy,
    and pass@1 of `settings.samples` samples at the rollout `temperature`. The samples draw
    from torch's generator seeded by (seed, step) and its state is put back after, so scoring
    never changes the training run's random stream."""

    policy: Any
    tokenizer: Any
    problems: list[tuple[str, str]]
    settings: HeldoutSettings
    max_new_tokens: int
    temperature: float
    seed: int
    path: Path

    def __call__(self, step: int) -> None:
        import torch

        if not self.problems or any(r["step"] == step for r in read_metrics(self.path)):
            return
        started = time.perf_counter()
        record = {"step": step, "problems": len(self.problems), "heldout_accuracy": verified_accuracy(
            self.policy, self.tokenizer, self.problems, self.max_new_tokens, self.settings.batch_prompts)}
        if self.settings.samples:
            rng_state = torch.get_rng_state()
            torch.manual_seed(self.seed + 7919 * step)
            record["heldout_sampled_accuracy"] = verified_accuracy(
                self.policy, self.tokenizer, self.problems, self.max_new_tokens, self.settings.batch_prompts,
                self.settings.samples, self.temperature)
            torch.set_rng_state(rng_state)
        record["eval_time_s"] = round(time.perf_counter() - started, 2)
        append_record(self.path, record)


def heldout_scorer(setup: RLSetup, config: Any, run_dir: Path) -> HeldoutScorer:
    """The single-turn RL trainers' held-out scorer: `config.heldout` on the setup's held-out
    problems, sampled as the rollouts are (`max_new_tokens`, `temperature`)."""
    return HeldoutScorer(setup.policy, setup.tokenizer, setup.heldout, config.heldout, config.max_new_tokens,
                         config.temperature, config.train.seed, run_dir / HELDOUT_FILE)


@exclusive()
def run_rl(
    backend_module: torch.nn.Module,
    policy: Any,
    tokenizer: Any,
    config: TrainConfig,
    num_prompts: int,
    run_dir: Path,
    *,
    make_step: Callable[[TorchBackend, EpochSampler], StepFunction],
    save_model: Callable[[torch.nn.Module, Path], None],
    scorer: Callable[[int], None],
    score_every_steps: int,
    final_dir: Path,
    description: str,
) -> list[dict[str, Any]]:
    """`config.max_steps` RL steps of `batch_size_rows` prompts each; returns the step records.

    `backend_module` holds every trainable parameter (the policy, and a value head for PPO);
    `make_step(backend, sampler)` returns the algorithm's step. `scorer(step)` appends the
    held-out score of that step to `run_dir / HELDOUT_FILE` (`HeldoutScorer` for single-turn
    problems); it runs before training, every `score_every_steps` and at the end.
    """
    run = Run.start(config, run_dir, description, save_model=save_model, num_rows=num_prompts,
                    build_backend=functools.partial(local_backend, backend_module, config),
                    evaluation=Evaluation(scorer, HELDOUT_FILE, score_every_steps))
    step_function = make_step(run.backend, run.sampler)
    run.keep_step_state(step_function)
    records = run.loop(functools.partial(rl_step, run, step_function))
    run.finish(final_dir)
    return records


def rl_step(run: Run, step_function: StepFunction, step: int) -> dict[str, Any]:
    """One RL step at the scheduled learning rate on the sampler's next prompts; the run stops
    on a non-finite loss or gradient norm (naming the update of the step that produced it)."""
    step_started = time.perf_counter()
    learning_rate = run.learning_rate(step)
    record = step_function(step, run.sampler.next_batch(), learning_rate)
    for name in ("loss", "grad_norm"):
        value = record.get(name)
        if value is not None:
            update = f" (update {record['updates']} of the step)" if name == "grad_norm" and "updates" in record else ""
            run.check_finite(step, name, value, update)
    return {"step": step + 1, "learning_rate": learning_rate, **record,
            "step_time_s": time.perf_counter() - step_started, "elapsed_s": run.elapsed_s()}


def summarize_rl(run_dir: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Run metrics over every step, including those before a resume (read from the live log)."""
    every = read_metrics(run_dir / STEP_LOG_FILE) or records
    heldout = read_metrics(run_dir / HELDOUT_FILE)
    tail = every[-min(5, len(every)):]
    metrics: dict[str, Any] = {
        "steps": len(every),
        "reward_mean_first": every[0]["reward_mean"],
        "reward_mean_last5": sum(r["reward_mean"] for r in tail) / len(tail),
        "rollout_time_s": round(sum(r["rollout_time_s"] for r in every), 2),
        "update_time_s": round(sum(r["update_time_s"] for r in every), 2),
        "train_time_s": round(sum(r["step_time_s"] for r in every), 2),
        "training_flops": every[-1]["training_flops"],
        "reward_errors": every[-1]["reward_errors"],
    }
    if metrics["reward_errors"]:  # what failed, not only how often (the first three, in step order)
        metrics["reward_error_examples"] = [e for r in every for e in r.get("reward_error_examples", [])][:3]
    if heldout:
        metrics.update({"heldout_accuracy_before": heldout[0]["heldout_accuracy"],
                        "heldout_accuracy_after": heldout[-1]["heldout_accuracy"],
                        "heldout_problems": heldout[-1]["problems"]})
        if "heldout_sampled_accuracy" in heldout[0]:
            metrics.update({"heldout_sampled_accuracy_before": heldout[0]["heldout_sampled_accuracy"],
                            "heldout_sampled_accuracy_after": heldout[-1]["heldout_sampled_accuracy"]})
    return metrics


def publish_rl_metrics(run_dir: Path, out_dir: Path, title: str, metrics: dict[str, Any]) -> None:
    """The step log (jsonl, csv for `dvc plots`), the held-out curve, metrics.json (DVC metrics)
    and a markdown summary."""
    records = read_metrics(run_dir / STEP_LOG_FILE)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    write_records(out_dir / PUBLISHED_STEP_LOG_FILE, records)
    write_csv(out_dir / PUBLISHED_STEP_CSV_FILE, records, RL_CSV_COLUMNS)
    heldout = read_metrics(run_dir / HELDOUT_FILE)
    write_records(out_dir / HELDOUT_FILE, heldout)
    write_csv(out_dir / "heldout_accuracy.csv", heldout, ("step", "heldout_accuracy", "heldout_sampled_accuracy"))
    lines = metrics_table(title, metrics) + reward_error_lines(metrics)
    if heldout:
        lines += ["", "| step | held-out greedy accuracy | held-out sampled accuracy (pass@1) |", "|---:|---:|---:|"]
        lines += [f"| {r['step']} | {r['heldout_accuracy']:.3f} | {r.get('heldout_sampled_accuracy', float('nan')):.3f} |"
                  for r in heldout]
    (out_dir / TRAIN_REPORT_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def reward_error_lines(metrics: dict[str, Any]) -> list[str]:
    """The report's reward-failure section: how many calls failed (each was rewarded 0) and
    up to three of them, so a broken reward function is seen, not only counted."""
    if not metrics.get("reward_errors"):
        return []
    lines = ["", "## Reward errors", "",
             f"{metrics['reward_errors']} reward function calls failed and were rewarded 0. First examples:", ""]
    return lines + [f"- {example}" for example in metrics.get("reward_error_examples", [])]


def produce_rl(spec: ComponentSpec, trainer: str, title: str, config: Any, inputs: dict[str, str], dest: str,
               overwrite: bool) -> Manifest:
    """Publish an RL trainer's run (`trainer`, the spec's name in launch.TRAINERS) as a component:
    the job runs in this process (RL trainers have no launcher), then its step log and held-out
    curve are published."""
    if config.train.distributed.launcher != "none":
        raise ConfigError(f"{trainer}: train.distributed.launcher must be 'none' (RL trainers run in one process)")
    return produce_trained(spec, config, inputs, dest, title, overwrite=overwrite, publish=publish_rl_metrics)
