"""RLHF with PPO (Ouyang et al. 2022, "InstructGPT", §3.5; Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", §2.2), on the formulas of `components.train.losses`.

- The policy has a value head (a linear layer on the last hidden state, initialised to
  zero), trained with the clipped value loss (`losses.value_loss`).
- A frozen copy of the starting policy is the reference. The KL to it is either a per-token
  reward penalty (`kl_mode: reward`, Ziegler et al. eq. 2, with k1 = log pi - log ref) with
  a fixed coefficient or the adaptive controller of Ziegler et al. §2.2 (the coefficient
  moves so the measured KL tracks `kl_target`), or a loss term (`kl_mode: loss`, k3). The
  penalty is `losses.kl_penalized_rewards`, the controller `losses.KLController`.
- The sequence reward is a reward model's score (a `reward_model` artifact: a sequence
  classifier with one output), or the weighted sum of reward functions
  (`components.train.rewards`), or both: `reward_model_weight` x score + the functions' sum
  (`reward_sources`: functions other than the default next to a reward model, without a
  weight, are refused rather than ignored), placed on the last completion token; advantages
  and returns by GAE (`losses.gae_advantages`), advantages whitened over the batch
  (`losses.whiten`, as TRL, OpenRLHF and verl do).
- Each batch of rollouts is used for `ppo_epochs` epochs of `minibatches` updates with the
  clipped surrogate (`losses.ppo_policy_loss`).

A step is two phases: `PPOStep.rollout` (sample, reward, old and reference log-probs, values,
advantages) and `PPOStep.update` (the minibatch updates, each `PPOStep.minibatch_loss`).

Logged per step: reward mean / std, KL, KL coefficient, entropy, clip fractions, value loss,
response length, rollout vs update time. A non-finite gradient norm in any minibatch ends the
step there, before that update is applied, and `run_rl` stops the run on it.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.errors import ConfigError
from components.models import sampling
from components.models.logprobs import completion_logprobs
from components.models.precision import precision_autocast
from components.models.reward import load_reward_model
from components.models.reward import score as reward_model_score
from components.models.tokenizers import check_same_tokenizer
from components.train.backends import local_precision_metrics
from components.train.config import TrainConfig
from components.train.launch import Job, Trained, TrainerJob
from components.train.optim import OptimConfig
from components.train.publish import ModelSaver
from components.train.losses import (
    POLICY_LOSSES, KLController, gae_advantages, kl_estimate, kl_penalized_rewards, masked_mean, value_loss, whiten,
)
from components.train.rewards import RewardSpec, check_errors, score
from components.train.rl import (
    HeldoutSettings, RLSetup, RunningTotals, heldout_scorer, load_rl_setup, produce_rl, run_rl, step_grad_norm,
    summarize_rl,
)

SPEC = ComponentSpec(name="ppo", version="1")
VALUE_HEAD_FILE = "value_head.pt"


class PPOConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=30, batch_size_rows=16, checkpoint_every_steps=10,
        optim=OptimConfig(learning_rate=1e-4, warmup_steps=0, weight_decay=0.0, lr_schedule="constant")),
        description="max_steps rollout batches of batch_size_rows prompts.")
    samples_per_prompt: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(function="correctness")],
                                      description="Reward functions; with a reward_model input, used only when "
                                                  "reward_model_weight is set (the default is then ignored).")
    reward_model_weight: float | None = Field(None, description=(
        "With a reward_model input: the reward is this x the model's score + the reward functions' weighted sum "
        "(null: the model's score alone; other than default rewards are then refused)."))
    on_reward_error: Literal["zero", "stop"] = "zero"
    max_reward_error_fraction: float = Field(1.0, ge=0, le=1, description=(
        "Stop the run (nothing published) when one reward function failed on at least this share of a step's "
        "samples (1: on every sample; 0: on any)."))
    kl_mode: Literal["reward", "loss"] = Field("reward", description="KL as a per-token reward penalty or a loss term.")
    kl_coef: float = Field(0.05, ge=0, description="Initial (or fixed) KL coefficient.")
    kl_target: float | None = Field(None, gt=0, description="Adaptive controller's target KL per sequence (null: fixed).")
    kl_horizon: int = Field(10_000, gt=0, description="Adaptive controller's horizon in samples.")
    gamma: float = Field(1.0, gt=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    ppo_epochs: int = Field(4, ge=1)
    minibatches: int = Field(2, ge=1, description="Updates per epoch (the batch split into this many).")
    eps_clip: float = Field(0.2, gt=0, lt=1)
    value_clip: float | None = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    problems_format: Literal["gsm8k", "rl"] = "gsm8k"
    max_problems: int = Field(100_000, gt=0)
    heldout: HeldoutSettings = HeldoutSettings()

    hash_omits_at_default: ClassVar[tuple[str, ...]] = ("reward_model_weight", "max_reward_error_fraction")


DEFAULT_REWARDS = PPOConfig.model_fields["rewards"].get_default(call_default_factory=True)


def reward_sources(config: PPOConfig, has_reward_model: bool) -> str:
    """What rewards this run: "functions", "reward_model" or "reward_model+functions". Functions
    a user configured are never silently dropped for a reward model: without
    `reward_model_weight` that pair is refused, naming both."""
    if not has_reward_model:
        if config.reward_model_weight is not None:
            raise ConfigError("ppo: reward_model_weight is set but no reward_model input is given")
        if not config.rewards:
            raise ConfigError("ppo: no reward: give a reward_model input or configure ppo.rewards")
        return "functions"
    if config.reward_model_weight is not None:
        return "reward_model+functions" if config.rewards else "reward_model"
    if config.rewards and config.rewards != DEFAULT_REWARDS:
        names = ", ".join(spec.function for spec in config.rewards)
        raise ConfigError(f"ppo: rewards ({names}) and a reward_model input are both given: set "
                          "ppo.reward_model_weight to add the model's score to the functions' weighted sum, "
                          "or drop one of them")
    return "reward_model"


class PolicyWithValue(nn.Module):
    """The trained module: the policy and its value head, a linear layer on the last hidden
    state, initialised to zero and kept in fp32."""

    def __init__(self, policy: Any) -> None:
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.hidden_size, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        self.value_head.to(torch.float32)


def minibatch_rows(rows: int, epochs: int, minibatches: int) -> Iterator[torch.Tensor]:
    """Row indices of each update: per epoch a fresh permutation cut into `minibatches` equal
    parts (a remainder is left out). Lazy, so each epoch's permutation is drawn from torch's
    global RNG when that epoch starts, after the previous epoch's updates."""
    per_minibatch = max(1, rows // minibatches)
    for _ in range(epochs):
        order = torch.randperm(rows)
        for start in range(0, rows - per_minibatch + 1, per_minibatch):
            yield order[start:start + per_minibatch]


@dataclass(frozen=True)
class SequenceRewards:
    """A rollout's sequence rewards as `source` (`reward_sources`) says: the reward model's
    score, the reward functions' weighted sum, or `reward_model_weight` x score + that sum."""

    config: PPOConfig
    source: str
    problems: list[tuple[str, str]]
    reward_model: Any = None
    reward_tokenizer: Any = None

    def __call__(self, step_index: int, indices: list[int], texts: list[str]) -> tuple[torch.Tensor, dict[str, Any], int]:
        """(rewards [rows], their per-source means and failure examples, reward function failures);
        a function failing on too many samples stops the run (`check_errors`)."""
        config, samples = self.config, self.config.samples_per_prompt
        total, extra = torch.zeros(len(texts)), {}
        if self.reward_model is not None:
            questions = [self.problems[i][0] for i in indices for _ in range(samples)]
            model_scores = torch.tensor(reward_model_score(self.reward_model, self.reward_tokenizer, questions, texts))
            if self.source == "reward_model":
                return model_scores, {}, 0
            total += config.reward_model_weight * model_scores
            extra["reward/reward_model"] = float(model_scores.mean())
        references = [self.problems[i][1] for i in indices for _ in range(samples)]
        scores = score(config.rewards, texts, references, config.on_reward_error)
        extra.update({f"reward/{name}": sum(v) / len(v) for name, v in scores.per_function.items()})
        if scores.errors:
            extra["reward_error_examples"] = scores.error_examples
        check_errors(scores, "ppo", step_index + 1, config.max_reward_error_fraction)
        return total + torch.tensor(scores.total), extra, scores.errors


@dataclass
class PPOBatch:
    """One step's rollout and what the updates need of it, computed before any update:
    [rows, prompt + completion] for `ids` and `attention`, [rows, completion] for the rest."""

    rollout: sampling.Rollout
    rewards: torch.Tensor  # [rows] sequence rewards
    reward_metrics: dict[str, Any]
    ids: torch.Tensor
    attention: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    ref_logprobs: torch.Tensor
    advantages: torch.Tensor  # GAE, whitened over the batch
    returns: torch.Tensor
    sequence_kl: float  # mean over sequences of the summed k1 KL to the reference


class PPOStep(RunningTotals):
    """`run_rl`'s step function: each call is one step (rollout, then `ppo_epochs` x
    `minibatches` updates). It holds the KL controller and counts reward failures and training
    FLOPs over the run; a checkpoint saves the three."""

    def __init__(self, config: PPOConfig, setup: RLSetup, module: PolicyWithValue, reference: Any,
                 rewards: SequenceRewards, backend: Any, sampler: Any) -> None:
        self.config, self.setup, self.module, self.reference, self.rewards = config, setup, module, reference, rewards
        self.backend, self.device = backend, backend.device
        self.policy_loss = POLICY_LOSSES["ppo_clip"]
        self.kl = KLController(config.kl_coef, config.kl_target, config.kl_horizon)

    def state_dict(self) -> dict[str, Any]:
        """The run's totals and the KL coefficient the controller has reached."""
        return {**super().state_dict(), "kl_coef": self.kl.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The totals, and an adaptive coefficient where it left off; a fixed one stays the config's."""
        super().load_state_dict(state)
        if self.kl.target is not None and "kl_coef" in state:
            self.kl = replace(self.kl, coef=float(state["kl_coef"]))

    def __call__(self, step_index: int, indices: torch.Tensor, learning_rate: float) -> dict[str, Any]:
        started = time.perf_counter()
        batch = self.rollout(step_index, indices.tolist())
        rollout_time_s = time.perf_counter() - started
        update_started = time.perf_counter()
        record, grad_norms, updates = self.update(batch, learning_rate)
        self.training_flops += self.setup.forward_flops_per_token * float(batch.attention.sum()) * 3  # rollout, old, ref
        rows, samples = batch.ids.shape[0], self.config.samples_per_prompt
        self.kl = self.kl.updated(batch.sequence_kl, rows)
        rewards = batch.rewards
        grouped = rewards.view(-1, samples)
        record.update({
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rows > 1 else 0.0,
            **batch.reward_metrics, "kl": batch.sequence_kl, "kl_coef": self.kl.coef,
            "zero_variance_fraction": float((grouped.max(1).values == grouped.min(1).values).float().mean())
            if samples > 1 else None,
            "response_length": float(batch.rollout.completion_mask.sum(1).mean()),
            "grad_norm": step_grad_norm(grad_norms), "updates": updates,
            "rollout_time_s": rollout_time_s, "update_time_s": time.perf_counter() - update_started,
            "reward_errors": self.reward_errors, "training_flops": self.training_flops,
        })
        return record

    def rollout(self, step_index: int, indices: list[int]) -> PPOBatch:
        """Sample, reward, and compute the old log-probs and values, the reference's log-probs,
        per-token rewards (KL-penalised in `kl_mode: reward`), GAE and whitened advantages."""
        config, setup, device = self.config, self.setup, self.device
        rollout = sampling.decode(setup.policy, setup.tokenizer, [setup.encoded[i] for i in indices],
                                  config.samples_per_prompt, config.max_new_tokens, config.temperature)
        rewards, reward_metrics, errors = self.rewards(step_index, indices, rollout.texts)
        self.reward_errors += errors
        ids, attention, mask = (rollout.input_ids.to(device), rollout.attention_mask.to(device),
                                rollout.completion_mask.to(device))
        width = rollout.prompt_width
        with torch.no_grad():
            old_logprobs, _, old_values = completion_logprobs(setup.policy, ids, attention, width, config.temperature,
                                                              values_head=self.module.value_head)
            ref_logprobs, _, _ = completion_logprobs(self.reference, ids, attention, width, config.temperature)
            kl_k1 = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask
            token_rewards = kl_penalized_rewards(rewards.to(device), kl_k1, mask,
                                                 self.kl.coef if config.kl_mode == "reward" else None)
            advantages, returns = gae_advantages(token_rewards, old_values * mask, mask, config.gamma, config.lam)
            advantages = whiten(advantages, mask)
        return PPOBatch(rollout, rewards, reward_metrics, ids, attention, mask, old_logprobs, old_values, ref_logprobs,
                        advantages, returns, float((kl_k1.sum(1)).mean()))

    def update(self, batch: PPOBatch, learning_rate: float) -> tuple[dict[str, float], list[float], int]:
        """`ppo_epochs` x `minibatches` updates; returns the mean loss statistics over the
        updates, their gradient norms and their count. A non-finite gradient norm ends the step
        there (the optimizer did not step; run_rl stops the run on this step's grad_norm)."""
        sums = dict.fromkeys(("loss", "policy_loss", "value_loss", "entropy", "clip_fraction_low",
                              "clip_fraction_high"), 0.0)
        grad_norms, updates = [], 0
        for pick in minibatch_rows(batch.ids.shape[0], self.config.ppo_epochs, self.config.minibatches):
            pick = pick.to(self.device)
            loss, terms = self.minibatch_loss(batch, pick)
            loss.backward()
            grad_norms.append(self.backend.optimizer_step(learning_rate))
            updates += 1
            if not math.isfinite(grad_norms[-1]):
                break
            for name, value in terms.items():
                sums[name] += float(value.detach())
            self.training_flops += self.setup.training_flops_per_token * float(batch.attention[pick].sum())
        return {name: value / max(1, updates) for name, value in sums.items()}, grad_norms, updates

    def minibatch_loss(self, batch: PPOBatch, pick: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of the rows `pick`: clipped surrogate + value_coef x clipped value loss (+ the
        k3 KL term in `kl_mode: loss`), and the terms logged."""
        config, mask = self.config, batch.mask[pick]
        with precision_autocast(self.device.type, self.backend.precision):
            logprobs, entropies, values = completion_logprobs(
                self.setup.policy, batch.ids[pick], batch.attention[pick], batch.rollout.prompt_width,
                config.temperature, entropy=True, values_head=self.module.value_head)
        pg_loss, stats = self.policy_loss(logprobs, batch.old_logprobs[pick], batch.advantages[pick], mask,
                                          config.eps_clip, config.eps_clip)
        vf_loss = value_loss(values, batch.old_values[pick], batch.returns[pick], mask, config.value_clip)
        loss = pg_loss + config.value_coef * vf_loss
        if config.kl_mode == "loss":
            loss = loss + self.kl.coef * masked_mean(kl_estimate(logprobs, batch.ref_logprobs[pick], "k3"), mask)
        return loss, {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss,
                      "entropy": masked_mean(entropies, mask), "clip_fraction_low": stats["clip_fraction_low"],
                      "clip_fraction_high": stats["clip_fraction_high"]}


def load_sequence_rewards(config: PPOConfig, setup: RLSetup, paths: dict[str, Path]) -> SequenceRewards:
    """The run's reward (`reward_sources`), with the reward model loaded when one is given (it
    must use the policy's tokenizer)."""
    source = reward_sources(config, "reward_model" in paths)
    if "reward_model" not in paths:
        return SequenceRewards(config, source, setup.problems)
    check_same_tokenizer("reward model", paths["reward_model"], "policy", paths["model"])
    return SequenceRewards(config, source, setup.problems, *load_reward_model(paths["reward_model"]))


def fit(job: Job) -> Trained:
    config = job.config
    setup = load_rl_setup(job.paths, config)
    tokenizer, policy = setup.tokenizer, setup.policy
    module = PolicyWithValue(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    rewards = load_sequence_rewards(config, setup, job.paths)
    records = run_rl(module, policy, tokenizer, config.train, len(setup.problems), job.run_dir,
                     make_step=functools.partial(PPOStep, config, setup, module, reference, rewards),
                     save_model=ModelSaver(tokenizer, model="policy", value_head_file=VALUE_HEAD_FILE),
                     scorer=heldout_scorer(setup, config, job.run_dir), score_every_steps=config.heldout.every_steps,
                     final_dir=job.out_dir, description="ppo")
    precision = local_precision_metrics(config.train)
    return Trained(0, lambda: {**summarize_rl(job.run_dir, records), "reward_source": rewards.source, **precision})


train_job = TrainerJob(PPOConfig, fit)


def ppo(config: PPOConfig, model: str, problems: str, dest: str, heldout: str | None = None,
        reward_model: str | None = None, overwrite: bool = False) -> Manifest:
    """Train `model` by PPO on `problems`, rewarded by `reward_model` (a reward_model artifact)
    or by the configured reward functions, or both (`reward_sources`); held-out greedy accuracy
    before, during and after."""
    reward_sources(config, reward_model is not None)  # refused before anything runs
    inputs = {"model": model, "problems": problems, **({"heldout": heldout} if heldout else {}),
              **({"reward_model": reward_model} if reward_model else {})}
    return produce_rl(SPEC, "ppo", "PPO", config, inputs, dest, overwrite)
