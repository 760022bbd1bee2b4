"""An agent's success on an environment's test tasks without tools, with tools, and with tools
and Reflexion's trials, each with its 95 % interval and what it cost in tokens and FLOPs.

Invariant: every success rate, count and token cost this component reports is recomputable
from `transcripts.jsonl` alone (each trajectory's `to_json`, with its method, trial and the
reflection decode after it), and every FLOPs figure from it and the model's F below: a task is
solved under a method when one of its recorded trials has final reward 1, and its cost is the
sum of its recorded trials' (and reflections') costs below.

Tasks are `tasks` consecutive TEST seeds (`SPLIT_SEEDS["test"]`) from the `first_task`-th, never
train or validation ones; a later `first_task` gives a slice of the test split that no earlier
evaluation looked at. Methods (CoALA's action spaces, Sumers et al. 2023, §4):
  no_tools    the environment with no tools (its no-tools instructions, no schemas); one turn,
              so the agent answers in its first turn (a tool call there is an unknown tool and
              ends it at the `turns` limit);
  tools       one ReAct trial (Yao et al. 2022) with the environment's tools;
  reflection  up to `trials` trials with tools; after each failed one the policy's reflection
              goes to episodic memory and opens the next (Reflexion, Shinn et al. 2023, §3;
              `components.agents.loop.run_trials_batched`, `batch_tasks` tasks at a time).
              Solved after k trials: any of the first k succeeded; the curve over k = 1..trials
              says whether trials help.

Cost. The loop decodes each turn from the episode's whole context without a cache across
turns (`components.models.sampling.decode`: one prefill of the context, then one forward per
sampled id but the last), so a turn with context C (prompt, earlier policy and observation
ids) that samples g ids processes C + g - 1 tokens, at F(C + g) forward FLOPs per token,
F(T) = 2N + 4·L·H·Q·T (PaLM, Chowdhery et al. 2022, App. B;
`components.feasibility.model_flops.inference_flops_per_token`):

    FLOPs(task) = sum over its trials' turns and its reflections of (C + g - 1) · F(C + g)

A reflection is one such decode (C: its prompt, `loop.reflection_prompt_ids`; g: the ids it
sampled, `loop.Reflection`). Left padding of a batch is not
counted (it is the batch's overhead, not the task's). Per solved task: the method's
total over all tasks divided by the tasks it solved (None when it solved none).

`accuracy_vs_compute.csv` has `components.eval.accuracy`'s curve format, so that
`components.eval.compare.compare_test_time_compute` compares an SFT agent's evaluation with
an RL-trained agent's as is. It speaks that component's vocabulary (`CURVE_METHODS`): one
trial with tools is `oracle`@1 (one attempt, as accuracy's oracle@1 is one sample: what the
comparison takes as the RL model's single answer and as an answer-key-free SFT method);
reflection is `reflection (verifier)`@k (the environment's verdict decides another trial, as
accuracy's verifier-fed reflection: never a method usable without the answer key).
"""

from __future__ import annotations

import copy
import csv
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from components.agents.envs import SPLIT_SEEDS, EnvConfig, TextEnv
from components.agents.loop import AgentLimits
from components.agents.trajectory import LIMITS, Trajectory
from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.eval.accuracy import CURVE_FILE
from components.models.precision import AUTO_HELP, precision_autocast, precision_record

SPEC = ComponentSpec(name="evaluate_agent", version="2")  # 2: reflection trials batched, charged their sampled ids
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
TRANSCRIPTS_FILE = "transcripts.jsonl"
METHODS = ("no_tools", "tools", "reflection")
CURVE_COLUMNS = ["method", "n", "accuracy", "generated_tokens", "inference_flops"]  # accuracy.py's CURVE_FILE
CURVE_METHODS = {"no_tools": "no_tools", "tools": "oracle", "reflection": "reflection (verifier)"}
FlopsPerToken = Callable[[int], float]  # context tokens -> forward FLOPs per token


class AgentEvalConfig(StrictConfig):
    hash_omits_at_default: ClassVar[tuple[str, ...]] = ("first_task",)  # evaluations before it keep their keys
    env: EnvConfig = Field(description="The environment (`name` required) and its tools (`tools`).")
    methods: list[Literal["no_tools", "tools", "reflection"]] = Field(
        default_factory=lambda: list(METHODS), min_length=1, description="The methods to evaluate, in this order.")
    tasks: int = Field(100, gt=0, le=len(SPLIT_SEEDS["test"]), description="How many test-split seeds, in order.")
    first_task: int = Field(0, ge=0, description=(
        "Start at the test split's `first_task`-th seed (0: its first): a fresh slice for a study whose "
        "earlier evaluations already looked at the first ones."))
    trials: int = Field(3, ge=1, description="reflection: trials per task at most (Reflexion's k).")
    limits: AgentLimits = Field(default_factory=AgentLimits, description="Turns, tokens and wall time per episode.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature of every turn (0: greedy).")
    precision: Literal["auto", "fp32", "bf16"] = Field("fp32", description=(
        "bf16: decode under bf16 autocast; " + AUTO_HELP))
    reflection_max_new_tokens: int = Field(64, gt=0, description="reflection: tokens a reflection may sample.")
    batch_tasks: int = Field(16, gt=0, description=(
        "Tasks decoded together (each method; reflection: each trial's unsolved tasks and their reflections); "
        "limits.max_wall_seconds bounds each such batch."))
    seed: int = Field(0, description="Seeds torch's RNG before each method (sampling at temperature > 0).")

    @model_validator(mode="after")
    def _named_env_distinct_methods(self) -> AgentEvalConfig:
        if self.env.name is None:
            raise ValueError("env.name is required: one of arithmetic, lookup, gsm8k")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods {self.methods} name a method twice")
        if self.first_task + self.tasks > len(SPLIT_SEEDS["test"]):
            raise ValueError(f"first_task {self.first_task} + tasks {self.tasks} runs past the test split's "
                             f"{len(SPLIT_SEEDS['test'])} seeds")
        return self

    def test_seeds(self) -> list[int]:
        """The evaluated tasks' seeds, in order."""
        return list(SPLIT_SEEDS["test"][self.first_task:self.first_task + self.tasks])


@dataclass(frozen=True)
class TaskRun:
    """One task under one method: its trials in order, and each reflection's decode between
    them as (prompt tokens, sampled tokens); reflection i follows trial i (one fewer than trials)."""

    trials: list[Trajectory]
    reflections: list[tuple[int, int]]


def decode_cost(context: int, sampled: int, flops_per_token: FlopsPerToken) -> tuple[int, int, float]:
    """(tokens processed, tokens sampled, FLOPs) of one decode: C + g - 1 tokens at F(C + g) (module doc)."""
    processed = context + max(sampled - 1, 0)
    return processed, sampled, processed * flops_per_token(context + sampled)


def run_cost(run: TaskRun, trials: int, flops_per_token: FlopsPerToken) -> tuple[int, int, float]:
    """(tokens processed, tokens sampled, FLOPs) of a task's first `trials` trials and the
    reflections between them."""
    decodes = [d for trajectory in run.trials[:trials] for d in trajectory.turn_decodes()]
    costs = [decode_cost(c, g, flops_per_token) for c, g in decodes + run.reflections[:trials - 1]]
    return sum(c[0] for c in costs), sum(c[1] for c in costs), sum(c[2] for c in costs)


def solved(run: TaskRun, trials: int) -> bool:
    """Whether one of the task's first `trials` trials succeeded."""
    return any(trajectory.final_reward > 0 for trajectory in run.trials[:trials])


def summary(runs: list[TaskRun], trials: int, flops_per_token: FlopsPerToken, stops: frozenset[int]
            ) -> dict[str, Any]:
    """A method's success with its 95 % Wilson interval and its per-task counts and costs, over
    each task's first `trials` trials (turns, tool calls, tool errors and limit hits summed over
    them). A turn that did not end with a stop id in `stops` was cut at max_new_tokens_per_turn:
    the loop judges it as it stands (no limit is recorded), so such turns are counted apart."""
    from components.eval.intervals import wilson_interval

    tasks, successes = len(runs), sum(solved(run, trials) for run in runs)
    episodes = [trajectory for run in runs for trajectory in run.trials[:trials]]
    turns = [turn for trajectory in episodes for turn in trajectory.turns]
    tokens, sampled, flops = (sum(values) for values in zip(*(run_cost(r, trials, flops_per_token) for r in runs)))
    limits = Counter(trajectory.limit_hit for trajectory in episodes if trajectory.limit_hit)
    low, high = wilson_interval(successes, tasks)
    return {"tasks": tasks, "successes": successes, "success_rate": successes / tasks,
            "success_ci95_low": low, "success_ci95_high": high, "episodes": len(episodes),
            "turns_per_task": len(turns) / tasks,
            "tool_calls_per_task": sum(turn.tool_call is not None for turn in turns) / tasks,
            "tool_errors_per_task": sum(turn.tool_error is not None for turn in turns) / tasks,
            "cut_turns_per_task": sum(not t.policy_ids or t.policy_ids[-1] not in stops for t in turns) / tasks,
            "limit_hits": sum(limits.values()), **{f"limit_hits_{name}": limits[name] for name in LIMITS},
            "tokens_per_task": tokens / tasks, "tokens_per_solved": tokens / successes if successes else None,
            "sampled_tokens_per_task": sampled / tasks,
            "flops_per_task": flops / tasks, "flops_per_solved": flops / successes if successes else None}


def method_results(method: str, runs: list[TaskRun], trials: int, flops_per_token: FlopsPerToken,
                   stops: frozenset[int]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """A method's flat metrics (`<method>_<name>`; reflection adds `_after_<k>` for each k) and
    its accuracy_vs_compute rows (k = 1..trials for reflection, 1 otherwise)."""
    counts = range(1, trials + 1) if method == "reflection" else [1]
    metrics = {f"{method}_{name}": value for name, value in summary(runs, counts[-1], flops_per_token, stops).items()}
    curve = []
    for k in counts:
        point = summary(runs, k, flops_per_token, stops)
        if method == "reflection":
            metrics[f"reflection_success_rate_after_{k}"] = point["success_rate"]
        curve.append({"method": CURVE_METHODS[method], "n": k, "accuracy": point["success_rate"],
                      "generated_tokens": point["sampled_tokens_per_task"], "inference_flops": point["flops_per_task"]})
    return metrics, curve


def without_tools(env: EnvConfig) -> TextEnv:
    """The environment `env` names with no tools (`tools: ()`): its instructions ask for none,
    its system prompt shows no schema, and a tool call is an unknown tool (an error observation)."""
    from components.agents.envs import make_env

    return make_env(env.name, env.model_copy(update={"tools": ()}))


def run_batched(model: Any, tokenizer: Any, env: TextEnv, seeds: list[int], limits: AgentLimits,
                config: AgentEvalConfig) -> list[TaskRun]:
    """One episode per seed, `batch_tasks` episodes decoded together (each on its own copy of `env`)."""
    from components.agents.loop import run_episodes

    runs = []
    for start in range(0, len(seeds), config.batch_tasks):
        chunk = seeds[start:start + config.batch_tasks]
        runs += [TaskRun([trajectory], []) for trajectory in run_episodes(
            model, tokenizer, [copy.copy(env) for _ in chunk], chunk, limits, config.temperature)]
    return runs


def run_methods(model: Any, tokenizer: Any, env: TextEnv, seeds: list[int], config: AgentEvalConfig
                ) -> dict[str, list[TaskRun]]:
    """Every configured method on every seed, torch's RNG seeded before each."""
    import torch

    from components.agents.loop import run_trials_batched

    runs: dict[str, list[TaskRun]] = {}
    for method in config.methods:
        torch.manual_seed(config.seed)
        if method == "no_tools":
            runs[method] = run_batched(model, tokenizer, without_tools(config.env), seeds,
                                       config.limits.model_copy(update={"max_turns": 1}), config)
        elif method == "tools":
            runs[method] = run_batched(model, tokenizer, env, seeds, config.limits, config)
        else:
            runs[method] = []
            for start in range(0, len(seeds), config.batch_tasks):
                chunk = seeds[start:start + config.batch_tasks]
                runs[method] += [TaskRun(trials, [(r.prompt_tokens, r.sampled_tokens) for r in reflections])
                                 for trials, reflections in run_trials_batched(
                                     model, tokenizer, [copy.copy(env) for _ in chunk], chunk, config.trials,
                                     config.limits, config.temperature,
                                     reflection_tokens=config.reflection_max_new_tokens, reflections_k=config.trials)]
    return runs


def write_transcripts(path: Path, runs: dict[str, list[TaskRun]]) -> None:
    """transcripts.jsonl: one line per trajectory, {method, trial, reflection_decode, trajectory}
    (reflection_decode: the reflection written after this trial, [prompt, sampled] tokens, or None)."""
    with open(path, "w", encoding="utf-8") as handle:
        for method, method_runs in runs.items():
            for run in method_runs:
                for trial, trajectory in enumerate(run.trials, start=1):
                    reflection = list(run.reflections[trial - 1]) if trial <= len(run.reflections) else None
                    handle.write(json.dumps({"method": method, "trial": trial, "reflection_decode": reflection,
                                             "trajectory": trajectory.to_json()}) + "\n")


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report_lines(config: AgentEvalConfig, metrics: dict[str, Any]) -> list[str]:
    """report.md: the setting, the table of methods, and the success curve across reflection trials."""
    env, first = config.env.name, config.test_seeds()[0]
    lines = [f"# Agent evaluation: {env}", "",
             f"{config.tasks} test-split tasks (seeds {first}..{first + config.tasks - 1}), "
             f"temperature {config.temperature}, limits: {config.limits.max_turns} turns, "
             f"{config.limits.max_new_tokens_per_turn} tokens per turn, {config.limits.max_episode_tokens} per episode, "
             f"{config.limits.max_wall_seconds:g} s, {metrics['precision']} ({metrics['precision_reason']}); "
             "counts and costs are per task (summed over its trials).", "",
             "| environment | method | success [95 % CI] | tasks | turns | tool calls | tool errors | limit hits "
             "| turns cut at the token cap | tokens / solved | FLOPs / solved |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for method in config.methods:
        m = {key[len(method) + 1:]: value for key, value in metrics.items() if key.startswith(f"{method}_")}
        name = f"reflection (k = {config.trials})" if method == "reflection" else method
        lines.append(f"| {env} | {name} | {m['success_rate']:.3f} [{m['success_ci95_low']:.3f}, "
                     f"{m['success_ci95_high']:.3f}] | {m['tasks']} | {m['turns_per_task']:.2f} "
                     f"| {m['tool_calls_per_task']:.2f} | {m['tool_errors_per_task']:.2f} | {m['limit_hits']} "
                     f"| {m['cut_turns_per_task']:.2f} "
                     f"| {_cell(m['tokens_per_solved'], '.0f')} | {_cell(m['flops_per_solved'], '.3g')} |")
    if "reflection" in config.methods:
        lines += ["", "Success after k reflection trials (solved by any of the first k):", "",
                  "| k | success |", "|---:|---:|"]
        lines += [f"| {k} | {metrics[f'reflection_success_rate_after_{k}']:.3f} |" for k in range(1, config.trials + 1)]
    return lines


def _build(config: AgentEvalConfig, paths: dict[str, Path], out_dir: Path, precision: dict[str, str]
           ) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from components.agents.envs import make_env
    from components.feasibility.model_flops import inference_flops_per_token
    from components.models.chat import stop_ids
    from components.models.factory import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = load_causal_lm(paths["model"]).eval()
    env = make_env(config.env.name, config.env)
    seeds = config.test_seeds()
    runs = run_methods(model, tokenizer, env, seeds, config)
    flops_per_token = lambda context: inference_flops_per_token(model, context)  # noqa: E731
    metrics: dict[str, Any] = {"env": config.env.name, "tasks": config.tasks, "first_test_seed": seeds[0],
                               **precision}
    curve: list[dict[str, Any]] = []
    for method, method_runs in runs.items():
        method_metrics, method_curve = method_results(method, method_runs, config.trials, flops_per_token,
                                                      frozenset(stop_ids(tokenizer)))
        metrics.update(method_metrics)
        curve += method_curve
    write_transcripts(out_dir / TRANSCRIPTS_FILE, runs)
    with open(out_dir / CURVE_FILE, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CURVE_COLUMNS)
        writer.writeheader()
        writer.writerows(curve)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out_dir / REPORT_FILE).write_text("\n".join(report_lines(config, metrics)) + "\n", encoding="utf-8")
    return metrics


def evaluate_agent(config: AgentEvalConfig, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Run the agent `model` on its environment's test tasks by each method and score it (see the module doc)."""
    from components.locks import exclusive  # sampling seeds the process-wide RNG, as training does

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        import torch

        precision = precision_record(config.precision, torch.device("cpu"))
        with exclusive(), precision_autocast("cpu", precision["precision"]):
            return _build(config, paths, out_dir, precision)

    return produce(SPEC, config, {"model": model}, dest, build, overwrite=overwrite)
