"""Agentic RL: multi-turn GRPO over whole episodes of a tool-using agent.

Invariant: the update trains on exactly the ids the policy sampled, in the context it sampled
them in; the observations the environment appended (tool outputs, the template's turn headers)
are in that context but masked from the loss.

It is GRPO (`components.train.grpo`) with one change: a rollout is `group_size` episodes of
each task (`components.agents.loop.run_episodes`, the ReAct loop, token-in/token-out)
instead of `group_size` single completions. `components.agents.trajectory.rollout_of` lays the
episodes out as GRPO's `Rollout` (prompt, then every later id; the completion mask is 1 on
policy ids only), so group advantages over episodes (DeepSeekMath §4.1), dynamic sampling over
episodes (DAPO §3.2), the clipped surrogate, checkpoints and exact resume are GRPO's own. The
reward is the environment's: 1 for a verified final answer, 0 otherwise (a limit hit ends an
episode with 0). Tasks are the environment's `train` seeds; the held-out curve is the greedy
success rate on `validation` seeds. Each step also logs the episodes' turns, tool calls, tool
errors and limit hits.
"""

from __future__ import annotations

import copy
import functools
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from components.agents.envs import SPLIT_SEEDS, EnvConfig, make_env
from components.agents.loop import AgentLimits, run_episodes
from components.agents.trajectory import Trajectory, rollout_of
from components.artifacts import ComponentSpec, Manifest
from components.errors import ConfigError
from components.feasibility.model_flops import inference_flops_per_token, training_flops_per_token
from components.models.factory import load_causal_lm
from components.models.precision import precision_autocast
from components.runlog import append_record, read_metrics
from components.train.backends import local_precision_metrics
from components.train.grpo import GRPOConfig, GRPOStep, Round
from components.train.grpo_study import GRPOStudyConfig, plan_seeds, summarize_study
from components.train.launch import Job, Trained, TrainerJob
from components.train.publish import ModelSaver
from components.train.rewards import Scores
from components.train.rl import HELDOUT_FILE, RLSetup, produce_rl, run_rl, summarize_rl

SPEC = ComponentSpec(name="agent_grpo", version="1")
ENVIRONMENT_REWARD = "environment"  # the per-function name the step log gives the environment's reward


class AgentGRPOConfig(GRPOConfig):
    """GRPO's settings, with episodes of `env` as rollouts: `limits` bound an episode (its
    `max_new_tokens_per_turn` is the per-turn budget), `max_problems` is how many train seeds
    tasks are drawn from, and the reward is the environment's, so `rewards`, `problems_format`
    and `max_new_tokens` are refused."""

    env: EnvConfig = Field(default_factory=lambda: EnvConfig(name="arithmetic"), description=(
        "The environment and its tools (env.tools: [] -- none, the agent must answer directly; None: its own)."))
    limits: AgentLimits = AgentLimits()

    @model_validator(mode="after")
    def _environment_reward(self) -> AgentGRPOConfig:
        for name, instead in (("rewards", "the environment's verified outcome is the reward"),
                              ("problems_format", "tasks are the environment's train seeds"),
                              ("max_new_tokens", "set limits.max_new_tokens_per_turn")):
            if getattr(self, name) != GRPOConfig.model_fields[name].get_default(call_default_factory=True):
                raise ConfigError(f"agent_grpo.{name}: not an agent setting ({instead}); remove it")
        if self.env.name is None:
            raise ConfigError("agent_grpo.env.name: name the environment (arithmetic, lookup or gsm8k)")
        return self


def episode_metrics(trajectories: list[Trajectory]) -> dict[str, Any]:
    """Per-episode means of turns, tool calls and tool errors, and how many episodes hit each limit."""
    episodes = max(1, len(trajectories))
    calls = sum(1 for t in trajectories for turn in t.turns if turn.tool_call is not None)
    errors = sum(1 for t in trajectories for turn in t.turns if turn.tool_error is not None)
    limits = Counter(t.limit_hit for t in trajectories if t.limit_hit)
    return {"turns": sum(len(t.turns) for t in trajectories) / episodes, "tool_calls": calls / episodes,
            "tool_errors": errors / episodes, "success_rate": sum(t.final_reward for t in trajectories) / episodes,
            **{f"limit_hits/{name}": count for name, count in sorted(limits.items())}}


@dataclass
class AgentSetup:
    """The policy, the environment and the train / validation task seeds."""

    rl: RLSetup
    env: Any  # built once (the lookup knowledge base, GSM8K's files); episodes run on shallow copies
    train_seeds: list[int]
    validation_seeds: list[int]

    def envs(self, count: int) -> list[Any]:
        """`count` distinct environments: copies share the task generator and tools, and each
        episode's `reset` gives its copy its own task."""
        return [copy.copy(self.env) for _ in range(count)]


class AgentGRPOStep(GRPOStep):
    """GRPO's step with episodes as rollouts; the step record adds the episodes' statistics."""

    def __init__(self, config: AgentGRPOConfig, setup: AgentSetup, reference: Any, backend: Any, sampler: Any) -> None:
        super().__init__(config, setup.rl, reference, backend, sampler)
        self.agent = setup
        self.generated_tokens_per_row = config.limits.max_episode_tokens
        self.episodes: list[Trajectory] = []

    def __call__(self, step_index: int, indices: torch.Tensor, learning_rate: float) -> dict[str, Any]:
        self.episodes = []
        record = super().__call__(step_index, indices, learning_rate)
        return {**record, **episode_metrics(self.episodes)}

    def rollout(self, indices: list[int]) -> Round:
        """`group_size` episodes of each task of `indices`, rewarded by the environment."""
        config, group = self.config, self.config.group_size
        seeds = [self.agent.train_seeds[i] for i in indices for _ in range(group)]
        with precision_autocast(self.device.type, self.rollout_precision):
            episodes = run_episodes(self.setup.policy, self.setup.tokenizer, self.agent.envs(len(seeds)),
                                    seeds, config.limits, config.temperature)
        self.episodes += episodes
        rewards = [float(t.final_reward) for t in episodes]
        rollout = rollout_of(episodes, self.setup.tokenizer.pad_token_id)
        decoded = sum(context + max(sampled - 1, 0) for t in episodes for context, sampled in t.turn_decodes())
        self.training_flops += self.setup.forward_flops_per_token * decoded  # each turn re-reads its whole context
        scores = Scores(total=rewards, per_function={ENVIRONMENT_REWARD: rewards}, samples=len(rewards),
                        errors_per_function={ENVIRONMENT_REWARD: 0})
        return Round(rollout, torch.tensor(rewards), scores)


@dataclass(frozen=True)
class EpisodeScorer:
    """Greedy success rate on the validation seeds at a step, appended to the held-out log
    (the same file and key as the single-turn trainers', so curves and summaries are shared)."""

    setup: AgentSetup
    limits: AgentLimits
    path: Path

    def __call__(self, step: int) -> None:
        seeds = self.setup.validation_seeds
        if not seeds or any(r["step"] == step for r in read_metrics(self.path)):
            return
        started = time.perf_counter()
        episodes = run_episodes(self.setup.rl.policy, self.setup.rl.tokenizer, self.setup.envs(len(seeds)),
                                seeds, self.limits, 0.0)
        append_record(self.path, {"step": step, "problems": len(seeds),
                                  "heldout_accuracy": sum(t.final_reward for t in episodes) / len(seeds),
                                  **{f"heldout_{k}": v for k, v in episode_metrics(episodes).items()},
                                  "eval_time_s": round(time.perf_counter() - started, 2)})


def load_agent_setup(paths: dict[str, Path], config: AgentGRPOConfig) -> AgentSetup:
    """The policy from `paths["model"]`, the environment and the task seeds."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    if tokenizer.pad_token_id is None:
        raise ConfigError(f"{paths['model']}: the tokenizer has no pad token")
    policy = load_causal_lm(paths["model"], dtype=torch.float32)
    env = make_env(config.env.name, config.env)  # a bad environment setting fails here, before any training
    train = list(SPLIT_SEEDS["train"][:config.max_problems])
    validation = list(SPLIT_SEEDS["validation"][:config.heldout.problems])
    context = config.limits.max_episode_tokens
    rl = RLSetup(tokenizer, policy, [], [], [], inference_flops_per_token(policy, context),
                 training_flops_per_token(policy, context))
    return AgentSetup(rl, env, train, validation)


def fit(job: Job) -> Trained:
    config: AgentGRPOConfig = job.config
    setup = load_agent_setup(job.paths, config)
    policy, tokenizer = setup.rl.policy, setup.rl.tokenizer
    if config.kl_coef > 0:
        raise ConfigError("agent_grpo.kl_coef: a KL term is not supported for episodes yet; set 0")
    records = run_rl(policy, policy, tokenizer, config.train, len(setup.train_seeds), job.run_dir,
                     make_step=functools.partial(AgentGRPOStep, config, setup, None),
                     save_model=ModelSaver(tokenizer, model=""),
                     scorer=EpisodeScorer(setup, config.limits, job.run_dir / HELDOUT_FILE),
                     score_every_steps=config.heldout.every_steps, final_dir=job.out_dir, description="agent_grpo")
    precision = local_precision_metrics(config.train)
    return Trained(0, lambda: {**summarize_rl(job.run_dir, records), **precision, "env": config.env.name,
                               "tools": list(setup.env.tools)})


train_job = TrainerJob(AgentGRPOConfig, fit)


def agent_grpo(config: AgentGRPOConfig, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Train `model` (an agent that has seen tool-use demonstrations) by multi-turn GRPO on
    the environment's train tasks; the held-out curve is greedy success on validation tasks."""
    return produce_rl(SPEC, "agent_grpo", "Agentic GRPO", config, {"model": model}, dest, overwrite)


STUDY_SPEC = ComponentSpec(name="agent_grpo_study", version="1")


class AgentGRPOStudyConfig(GRPOStudyConfig):
    """Agentic GRPO over several seeds: the spread across seeds is what a gain is compared with."""

    base: AgentGRPOConfig = AgentGRPOConfig()


def summarize_agent_study(config: AgentGRPOStudyConfig, dest: str, overwrite: bool = False,
                          **seeds: Any) -> Manifest:
    """The seeds' held-out success curves, mean +- std (`grpo_study`'s report, this study's spec)."""
    return summarize_study(config, dest, overwrite=overwrite, spec=STUDY_SPEC, **seeds)


def agent_grpo_study(config: AgentGRPOStudyConfig, model: str, dest: str, overwrite: bool = False,
                     map_runs: Any = map) -> Manifest:
    """Agentic GRPO once per seed (published as `DEST.seeds/seed<k>`), then the report."""
    plan = plan_seeds(config, dest)
    manifests = list(map_runs(lambda planned: agent_grpo(planned[1], model, planned[2], overwrite=overwrite), plan))
    return summarize_agent_study(config, dest, overwrite=overwrite,
                                 **{name: manifest.output for (name, _, _), manifest in zip(plan, manifests)})
