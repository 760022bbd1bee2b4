"""RLHF with PPO (Ouyang et al. 2022, "InstructGPT", §3.5; Ziegler et al. 2019, "Fine-Tuning
Language Models from Human Preferences", §2.2), on the formulas of `components.train.losses`.

- The policy has a value head (a linear layer on the last hidden state, initialised to
  zero), trained with the clipped value loss (`losses.value_loss`).
- A frozen copy of the starting policy is the reference. The KL to it is either a per-token
  reward penalty (`kl_mode: reward`, Ziegler et al. eq. 2, with k1 = log pi - log ref) with
  a fixed coefficient or the adaptive controller of Ziegler et al. §2.2 (the coefficient
  moves so the measured KL tracks `kl_target`), or a loss term (`kl_mode: loss`, k3).
- The sequence reward is a reward model's score (a `reward_model` artifact: a sequence
  classifier with one output), or the weighted sum of reward functions
  (`components.train.rewards`), or both: `reward_model_weight` x score + the functions' sum
  (`reward_sources`: functions other than the default next to a reward model, without a
  weight, are refused rather than ignored), placed on the last completion token; advantages
  and returns by GAE (`losses.gae_advantages`),
  advantages whitened over the batch (as TRL, OpenRLHF and verl do).
- Each batch of rollouts is used for `ppo_epochs` epochs of `minibatches` updates with the
  clipped surrogate (`losses.ppo_policy_loss`).

Logged per step: reward mean / std, KL, KL coefficient, entropy, clip fractions, value loss,
response length, rollout vs update time. A non-finite gradient norm in any minibatch ends the
step there, before that update is applied, and `run_rl` stops the run on it.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.errors import ConfigError
from components.train.engine import TrainConfig
from components.train.launch import read_job
from components.train.loop import OptimConfig
from components.train.rewards import RewardSpec
from components.train.rl import HeldoutSettings, produce_rl

if TYPE_CHECKING:
    import torch

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


def _policy_with_value(policy: Any) -> Any:
    """The trained module: the policy and its value head (torch is imported inside jobs only)."""
    import torch
    from torch import nn

    class Module(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.policy = policy
            self.value_head = nn.Linear(policy.config.hidden_size, 1)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    module = Module()
    module.value_head.to(torch.float32)
    return module


def adaptive_kl_coef(coef: float, measured_kl: float, target: float, samples: int, horizon: int) -> float:
    """Ziegler et al. 2019, §2.2: e = clip(KL / KL_target - 1, -0.2, 0.2); beta <- beta (1 + K_beta e),
    with K_beta = samples / horizon."""
    error = min(max(measured_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error * samples / horizon)


def minibatch_rows(rows: int, epochs: int, minibatches: int) -> Iterator[torch.Tensor]:
    """Row indices of each update: per epoch a fresh permutation cut into `minibatches` equal
    parts (a remainder is left out). Lazy, so each epoch's permutation is drawn from torch's
    global RNG when that epoch starts, after the previous epoch's updates."""
    import torch

    per_minibatch = max(1, rows // minibatches)
    for _ in range(epochs):
        order = torch.randperm(rows)
        for start in range(0, rows - per_minibatch + 1, per_minibatch):
            yield order[start:start + per_minibatch]


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from components.train.losses import gae_advantages, kl_estimate, masked_mean, ppo_policy_loss, value_loss
    from components.train.rewards import check_errors, score
    from components.models.logprobs import completion_logprobs
    from components.models.sampling import decode
    from components.train.rl import load_rl_setup, run_rl, step_grad_norm, summarize_rl

    job_ = read_job(job, PPOConfig)
    config, paths, run_dir, out_dir = job_.config, job_.paths, job_.run_dir, job_.out_dir
    setup = load_rl_setup(paths, config)
    tokenizer, policy, problems, encoded = setup.tokenizer, setup.policy, setup.problems, setup.encoded
    module = _policy_with_value(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    reward_model = reward_tokenizer = None
    source = reward_sources(config, "reward_model" in paths)
    if "reward_model" in paths:
        from components.models.tokenizers import check_same_tokenizer
        from components.models.reward import load_reward_model

        check_same_tokenizer("reward model", paths["reward_model"], "policy", paths["model"])
        reward_model, reward_tokenizer = load_reward_model(paths["reward_model"])
    forward_flops = setup.forward_flops_per_token  # per token: rollout, old and reference passes
    train_flops = setup.training_flops_per_token  # per token of each minibatch update
    samples = config.samples_per_prompt
    state = {"kl_coef": config.kl_coef, "reward_errors": 0, "training_flops": 0.0}

    def sequence_rewards(step_index: int, indices: list[int], texts: list[str]) -> tuple[Any, dict[str, Any]]:
        """The rollout's sequence rewards (as `source` says) and their per-source means."""
        total, extra = torch.zeros(len(texts)), {}
        if reward_model is not None:
            from components.models.reward import score as rm_score

            questions = [problems[i][0] for i in indices for _ in range(samples)]
            model_scores = torch.tensor(rm_score(reward_model, reward_tokenizer, questions, texts))
            if source == "reward_model":
                return model_scores, {}
            total += config.reward_model_weight * model_scores
            extra["reward/reward_model"] = float(model_scores.mean())
        references = [problems[i][1] for i in indices for _ in range(samples)]
        scores = score(config.rewards, texts, references, config.on_reward_error)
        state["reward_errors"] += scores.errors
        extra.update({f"reward/{name}": sum(v) / len(v) for name, v in scores.per_function.items()})
        if scores.errors:
            extra["reward_error_examples"] = scores.error_examples
        check_errors(scores, "ppo", step_index + 1, config.max_reward_error_fraction)
        return total + torch.tensor(scores.total), extra

    def make_step(backend: Any, sampler: Any):  # noqa: ANN202
        device = backend.device

        def step(step_index: int, indices: Any, learning_rate: float) -> dict[str, Any]:
            started = time.perf_counter()
            indices = indices.tolist()
            rollout = decode(policy, tokenizer, [encoded[i] for i in indices], samples, config.max_new_tokens,
                             config.temperature)
            rewards, per_function = sequence_rewards(step_index, indices, rollout.texts)
            ids, attention, mask = (rollout.input_ids.to(device), rollout.attention_mask.to(device),
                                    rollout.completion_mask.to(device))
            width = rollout.prompt_width
            with torch.no_grad():
                old_logprobs, _, old_values = completion_logprobs(policy, ids, attention, width, config.temperature,
                                                                  values_head=module.value_head)
                ref_logprobs, _, _ = completion_logprobs(reference, ids, attention, width, config.temperature)
                kl_k1 = kl_estimate(old_logprobs, ref_logprobs, "k1") * mask
                token_rewards = torch.zeros_like(old_logprobs)
                if config.kl_mode == "reward":
                    token_rewards -= state["kl_coef"] * kl_k1
                last = (mask.sum(1).long() - 1).clamp(min=0)
                token_rewards[torch.arange(len(last)), last] += rewards.to(device)
                advantages, returns = gae_advantages(token_rewards, old_values * mask, mask, config.gamma, config.lam)
                mean = masked_mean(advantages, mask)
                std = masked_mean((advantages - mean) ** 2, mask).sqrt()
                advantages = (advantages - mean) / (std + 1e-8) * mask  # whitened over the batch
            sequence_kl = float((kl_k1.sum(1)).mean())
            rollout_time_s = time.perf_counter() - started
            update_started = time.perf_counter()
            rows = ids.shape[0]
            sums = {"loss": 0.0, "policy_loss": 0.0, "value_loss": 0.0, "entropy": 0.0,
                    "clip_fraction_low": 0.0, "clip_fraction_high": 0.0}
            grad_norms, updates = [], 0
            for pick in minibatch_rows(rows, config.ppo_epochs, config.minibatches):
                pick = pick.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=backend.precision == "bf16"):
                    logprobs, entropies, values = completion_logprobs(
                        policy, ids[pick], attention[pick], width, config.temperature, entropy=True,
                        values_head=module.value_head)
                pg_loss, stats = ppo_policy_loss(logprobs, old_logprobs[pick], advantages[pick], mask[pick],
                                                 config.eps_clip, config.eps_clip)
                vf_loss = value_loss(values, old_values[pick], returns[pick], mask[pick], config.value_clip)
                loss = pg_loss + config.value_coef * vf_loss
                if config.kl_mode == "loss":
                    loss = loss + state["kl_coef"] * masked_mean(
                        kl_estimate(logprobs, ref_logprobs[pick], "k3"), mask[pick])
                loss.backward()
                grad_norms.append(backend.optimizer_step(learning_rate))
                updates += 1
                if not math.isfinite(grad_norms[-1]):
                    break  # the optimizer did not step; run_rl stops the run on this step's grad_norm
                for name, value in (("loss", loss), ("policy_loss", pg_loss), ("value_loss", vf_loss),
                                    ("entropy", masked_mean(entropies, mask[pick])),
                                    ("clip_fraction_low", stats["clip_fraction_low"]),
                                    ("clip_fraction_high", stats["clip_fraction_high"])):
                    sums[name] += float(value.detach())
                state["training_flops"] += train_flops * float(attention[pick].sum())
            record = {name: value / max(1, updates) for name, value in sums.items()}
            state["training_flops"] += forward_flops * float(attention.sum()) * 3  # rollout, old, reference
            if config.kl_target is not None:
                state["kl_coef"] = adaptive_kl_coef(state["kl_coef"], sequence_kl, config.kl_target, rows,
                                                    config.kl_horizon)
            grouped = rewards.view(-1, samples)
            record.update({
                "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if rows > 1 else 0.0,
                **per_function, "kl": sequence_kl, "kl_coef": state["kl_coef"],
                "zero_variance_fraction": float((grouped.max(1).values == grouped.min(1).values).float().mean())
                if samples > 1 else None,
                "response_length": float(rollout.completion_mask.sum(1).mean()),
                "grad_norm": step_grad_norm(grad_norms), "updates": updates,
                "rollout_time_s": rollout_time_s, "update_time_s": time.perf_counter() - update_started,
                "reward_errors": state["reward_errors"], "training_flops": state["training_flops"],
            })
            return record

        return step

    def save_model(wrapper: Any, directory: Path) -> None:
        wrapper.policy.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        torch.save(wrapper.value_head.state_dict(), directory / VALUE_HEAD_FILE)

    records = run_rl(module, policy, tokenizer, config.train, len(problems), run_dir, make_step=make_step,
                     save_model=save_model, heldout=setup.heldout, heldout_settings=config.heldout,
                     max_new_tokens=config.max_new_tokens, temperature=config.temperature, final_dir=out_dir, description="ppo")
    return {**summarize_rl(run_dir, records), "reward_source": source}


def ppo(config: PPOConfig, model: str, problems: str, dest: str, heldout: str | None = None,
        reward_model: str | None = None, overwrite: bool = False) -> Manifest:
    """Train `model` by PPO on `problems`, rewarded by `reward_model` (a reward_model artifact)
    or by the configured reward functions, or both (`reward_sources`); held-out greedy accuracy
    before, during and after."""
    reward_sources(config, reward_model is not None)  # refused before anything runs
    inputs = {"model": model, "problems": problems, **({"heldout": heldout} if heldout else {}),
              **({"reward_model": reward_model} if reward_model else {})}
    return produce_rl(SPEC, "ppo", "PPO", config, inputs, dest, overwrite)
