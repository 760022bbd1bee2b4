"""RL with verifiable rewards by GRPO (Shao et al. 2024, "DeepSeekMath", §4.1), with the
DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025) options.

Each step takes `batch_size_rows` prompts, samples `group_size` completions per prompt
(batched, KV cache: `components.models.sampling.decode`), scores them with plain Python reward
functions (`components.train.rewards`: answer correctness through the evaluators' verifier,
a format reward, any `module:function`), and turns rewards into group-relative advantages
(`losses.group_advantages`). With dynamic sampling (DAPO §3.2) groups whose rewards all agree
carry no signal and are dropped, and more prompts are sampled, up to `max_sampling_rounds`
rounds, to refill the batch. The policy is updated `iterations` times on the batch (GRPO's
mu) with the clipped surrogate (`losses.ppo_policy_loss`, clip-higher eps_low / eps_high),
computed with each prompt run once for its group (`fast_llama.shared_prompt_logprobs`),
aggregated per token, per sequence or by Dr. GRPO's constant; a KL term to the frozen
starting policy (`losses.kl_estimate`, k3) is off by default, as in DAPO and Dr. GRPO.

Logged per step: reward mean / std (and per reward function), KL, entropy, clip fractions
low / high, the fraction of zero-variance groups, response length, and rollout vs update time.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.train.engine import TrainConfig
from components.train.launch import read_job
from components.train.loop import OptimConfig
from components.train.losses import Aggregation, GroupNorm, KLEstimator
from components.train.rewards import RewardSpec
from components.train.rl import HeldoutSettings, produce_rl, step_grad_norm, summarize_rl

SPEC = ComponentSpec(name="grpo", version="1")



class GRPOConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=30, batch_size_rows=8, checkpoint_every_steps=10,
        optim=OptimConfig(learning_rate=2e-5, warmup_steps=0, weight_decay=0.0, lr_schedule="constant")),
        description="max_steps RL steps of batch_size_rows prompts; micro_batch_rows prompts per update chunk.")
    group_size: int = Field(4, ge=2, description="G: completions sampled per prompt.")
    max_new_tokens: int = Field(64, gt=0)
    temperature: float = Field(1.0, gt=0)
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(function="correctness")], min_length=1)
    on_reward_error: Literal["zero", "stop"] = Field("zero", description="zero: reward 0, counted; stop: raise at "
                                                                          "the first failure.")
    max_reward_error_fraction: float = Field(1.0, ge=0, le=1, description=(
        "With on_reward_error: zero, stop the run (nothing published) when one reward function failed on at least "
        "this share of a step's samples (1: on every sample; 0: on any)."))
    advantage_normalization: GroupNorm = "group_std"
    loss_aggregation: Aggregation = "token_mean"
    eps_low: float = Field(0.2, gt=0, lt=1)
    eps_high: float = Field(0.28, gt=0, description="DAPO's clip-higher upper range.")
    dual_clip: float | None = Field(None, gt=1)
    iterations: int = Field(1, ge=1, description="Updates per batch of rollouts (GRPO's mu).")
    kl_coef: float = Field(0.0, ge=0, description="beta of the KL-to-reference loss term; 0 loads no reference.")
    kl_estimator: KLEstimator = "k3"
    dynamic_sampling: bool = Field(True, description="Drop groups whose rewards all agree and refill (DAPO).")
    max_sampling_rounds: int = Field(3, ge=1, description="Rollout rounds per step at most, refills included.")
    problems_format: Literal["gsm8k", "rl"] = "gsm8k"
    max_problems: int = Field(100_000, gt=0)
    heldout: HeldoutSettings = HeldoutSettings()

    hash_omits_at_default: ClassVar[tuple[str, ...]] = ("max_reward_error_fraction",)


class _Chunk:
    """Rows of one rollout round that go into the update, with their advantages."""

    def __init__(self, rollout: Any, rows: list[int], advantages: Any) -> None:
        self.input_ids = rollout.input_ids[rows]
        self.attention_mask = rollout.attention_mask[rows]
        self.completion_mask = rollout.completion_mask[rows]
        self.prompt_width = rollout.prompt_width
        self.advantages = advantages


def train_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from components.models.fast_llama import shared_prompt_logprobs, supports
    from components.train.losses import aggregate_loss, group_advantages, kl_estimate, masked_mean, ppo_policy_loss
    from components.train.rewards import check_errors, score
    from components.models.logprobs import completion_logprobs
    from components.models.sampling import decode
    from components.train.rl import load_rl_setup, run_rl

    job_ = read_job(job, GRPOConfig)
    config, paths, run_dir, out_dir = job_.config, job_.paths, job_.run_dir, job_.out_dir
    setup = load_rl_setup(paths, config)
    tokenizer, policy, problems, encoded = setup.tokenizer, setup.policy, setup.problems, setup.encoded
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if config.kl_coef > 0 else None
    forward_flops, train_flops = setup.forward_flops_per_token, setup.training_flops_per_token
    group = config.group_size
    micro_prompts = config.train.micro_batch_rows or config.train.batch_size_rows
    shared_prompt = supports(policy)
    totals = {"training_flops": 0.0, "reward_errors": 0}

    def make_step(backend: Any, sampler: Any):  # noqa: ANN202
        device = backend.device

        def rollout_round(indices: list[int]) -> tuple[Any, Any, Any]:
            rollout = decode(policy, tokenizer, [encoded[i] for i in indices], group, config.max_new_tokens,
                             config.temperature)
            references = [problems[i][1] for i in indices for _ in range(group)]
            scores = score(config.rewards, rollout.texts, references, config.on_reward_error)
            totals["reward_errors"] += scores.errors
            prompt_tokens = int(rollout.attention_mask[:, :rollout.prompt_width].sum()) // group
            totals["training_flops"] += forward_flops * (prompt_tokens + float(rollout.completion_mask.sum()))
            return rollout, torch.tensor(scores.total), scores

        def group_logprobs(chunk: _Chunk, rows: slice, entropy: bool) -> tuple[Any, Any]:
            """Log-probs of a piece's completions: each prompt run once for its group (Llama), or
            every row as prompt + completion through the model's own forward."""
            ids, mask, width = chunk.input_ids[rows].to(device), chunk.attention_mask[rows].to(device), chunk.prompt_width
            if shared_prompt:
                return shared_prompt_logprobs(policy, ids[::group, :width], mask[::group, :width], ids[:, width:],
                                              chunk.completion_mask[rows].to(device), config.temperature, entropy)
            logprobs, entropies, _ = completion_logprobs(policy, ids, mask, width, config.temperature, entropy=entropy)
            return logprobs, entropies

        def step(step_index: int, indices: Any, learning_rate: float) -> dict[str, Any]:
            started = time.perf_counter()
            rollout, rewards, scores = rollout_round(indices.tolist())
            grouped = rewards.view(-1, group)
            zero_variance = (grouped.max(dim=1).values == grouped.min(dim=1).values)
            record: dict[str, Any] = {
                "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                **{f"reward/{name}": sum(values) / len(values) for name, values in scores.per_function.items()},
                "zero_variance_fraction": float(zero_variance.float().mean()),
                "response_length": float(rollout.completion_mask.sum(1).mean()),
                "finished_fraction": sum(rollout.finished) / len(rollout.finished),
            }
            chunks, kept_groups, rounds = [], 0, 1
            while True:
                keep = [g for g in range(grouped.shape[0]) if not (config.dynamic_sampling and zero_variance[g])]
                keep = keep[:config.train.batch_size_rows - kept_groups]
                if keep:
                    rows = [g * group + j for g in keep for j in range(group)]
                    advantages = group_advantages(rewards, group, config.advantage_normalization)[rows]
                    chunks.append(_Chunk(rollout, rows, advantages))
                    kept_groups += len(keep)
                if kept_groups >= config.train.batch_size_rows or rounds >= config.max_sampling_rounds \
                        or not config.dynamic_sampling:
                    break
                rounds += 1
                rollout, rewards, refill = rollout_round(sampler.next_batch().tolist())
                scores = scores.merge(refill)
                grouped = rewards.view(-1, group)
                zero_variance = (grouped.max(dim=1).values == grouped.min(dim=1).values)
            record.update({"sampling_rounds": rounds, "groups_trained": kept_groups,
                           **({"reward_error_examples": scores.error_examples} if scores.errors else {})})
            check_errors(scores, "grpo", step_index + 1, config.max_reward_error_fraction)
            # split chunks into update pieces of at most micro_prompts groups
            pieces = []
            for chunk in chunks:
                for start in range(0, chunk.input_ids.shape[0], micro_prompts * group):
                    pieces.append((chunk, slice(start, start + micro_prompts * group)))
            old_logprobs: dict[int, Any] = {}
            ref_logprobs: dict[int, Any] = {}
            if reference is not None:
                with torch.no_grad():
                    for piece_index, (chunk, rows) in enumerate(pieces):
                        ref_logprobs[piece_index], _, _ = completion_logprobs(
                            reference, chunk.input_ids[rows].to(device), chunk.attention_mask[rows].to(device),
                            chunk.prompt_width, config.temperature)
                        totals["training_flops"] += forward_flops * float(chunk.attention_mask[rows].sum())
            rollout_time_s = time.perf_counter() - started
            update_started = time.perf_counter()
            total_tokens = sum(float(c.completion_mask[r].sum()) for c, r in pieces)
            total_rows = sum(c.completion_mask[r].shape[0] for c, r in pieces)
            constant = config.max_new_tokens * total_rows
            sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction_low": 0.0, "clip_fraction_high": 0.0}
            grad_norms = []
            for iteration in range(config.iterations if pieces else 0):
                for piece_index, (chunk, rows) in enumerate(pieces):
                    mask = chunk.completion_mask[rows].to(device)
                    tokens, count = float(mask.sum()), mask.shape[0]
                    weight = {"token_mean": tokens / total_tokens, "sequence_mean": count / total_rows,
                              "constant": 1.0}[config.loss_aggregation]
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=backend.precision == "bf16"):
                        logprobs, entropies = group_logprobs(chunk, rows, iteration == 0)
                    if iteration == 0:  # the sampling policy's log-probs: these weights, before any update
                        old_logprobs[piece_index] = logprobs.detach()
                    old = old_logprobs[piece_index]
                    advantages = chunk.advantages[rows].to(device)[:, None].expand_as(logprobs)
                    loss, stats = ppo_policy_loss(logprobs, old, advantages, mask, config.eps_low, config.eps_high,
                                                  config.dual_clip, config.loss_aggregation, constant)
                    if reference is not None:
                        kl = kl_estimate(logprobs, ref_logprobs[piece_index], config.kl_estimator)
                        loss = loss + config.kl_coef * aggregate_loss(kl, mask, config.loss_aggregation, constant)
                        sums["kl"] += float(masked_mean(kl.detach(), mask)) * tokens / total_tokens / config.iterations
                    (loss * weight).backward()
                    sums["loss"] += float(loss.detach()) * weight / config.iterations
                    for name in ("clip_fraction_low", "clip_fraction_high"):
                        sums[name] += float(stats[name]) * tokens / total_tokens / config.iterations
                    if entropies is not None:
                        sums["entropy"] += float(masked_mean(entropies, mask)) * tokens / total_tokens
                    prompt_tokens = float(chunk.attention_mask[rows, :chunk.prompt_width].sum())
                    completion_tokens = float(chunk.completion_mask[rows].sum())
                    totals["training_flops"] += train_flops * (
                        prompt_tokens / (group if shared_prompt else 1) + completion_tokens)
                grad_norms.append(backend.optimizer_step(learning_rate))
                if not math.isfinite(grad_norms[-1]):
                    break  # the optimizer did not step; run_rl stops the run on this step's grad_norm
            record.update(sums if pieces else {"loss": None})
            if reference is None:
                record["kl"] = None
            record.update({
                "grad_norm": step_grad_norm(grad_norms), "updates": len(grad_norms),
                "rollout_time_s": rollout_time_s, "update_time_s": time.perf_counter() - update_started,
                "reward_errors": totals["reward_errors"], "training_flops": totals["training_flops"],
            })
            return record

        return step

    def save_model(module: Any, directory: Path) -> None:
        module.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    records = run_rl(policy, policy, tokenizer, config.train, len(problems), run_dir, make_step=make_step,
                     save_model=save_model, heldout=setup.heldout, heldout_settings=config.heldout,
                     max_new_tokens=config.max_new_tokens, temperature=config.temperature, final_dir=out_dir, description="grpo")
    return summarize_rl(run_dir, records)


def grpo(config: GRPOConfig, model: str, problems: str, dest: str, heldout: str | None = None,
         overwrite: bool = False) -> Manifest:
    """Train `model` (an SFT model artifact) by GRPO on `problems` (GSM8K-format jsonl); score
    greedy accuracy on `heldout` problems before, during and after. `heldout` is for monitoring
    and tuning (the pipeline passes the task's validation split), never the reported test set."""
    inputs = {"model": model, "problems": problems, **({"heldout": heldout} if heldout else {})}
    return produce_rl(SPEC, "grpo", "GRPO", config, inputs, dest, overwrite)
