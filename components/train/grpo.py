"""RL with verifiable rewards by GRPO (Shao et al. 2024, "DeepSeekMath", §4.1), with the
DAPO (Yu et al. 2025) and Dr. GRPO (Liu et al. 2025) options.

Each step takes `batch_size_rows` prompts, samples `group_size` completions per prompt
(batched, KV cache: `components.models.sampling.decode`), scores them with plain Python reward
functions (`components.train.rewards`: answer correctness through the evaluators' verifier,
a format reward, any `module:function`), and turns rewards into advantages by the estimator
`advantage_estimator` names (`losses.ADVANTAGE_ESTIMATORS`: GRPO's group-relative
`group_advantages`, or RLOO's leave-one-out `rloo_advantages`). With dynamic sampling (DAPO
§3.2) groups whose rewards all agree carry no signal and are dropped, and more prompts are
sampled, up to `max_sampling_rounds` rounds, to refill the batch. The policy is updated
`iterations` times on the batch (GRPO's mu) with the clipped surrogate
(`losses.ppo_policy_loss`, clip-higher eps_low / eps_high), computed with each prompt run once
for its group (`fast_llama.shared_prompt_logprobs`), aggregated per token, per sequence or by
Dr. GRPO's constant (`losses.aggregate_loss`, micro-batches weighted by
`losses.aggregation_weight`); a KL term to the frozen starting policy (`losses.kl_estimate`,
k3) is off by default, as in DAPO and Dr. GRPO.

A step is three phases: `GRPOStep.rollout` (sample and score one round), `fill_batch`
(dynamic sampling: keep the groups with signal, refill, compute advantages) and
`GRPOStep.update` (the `iterations` passes over the batch's micro-batch pieces).

Logged per step: reward mean / std (and per reward function), KL, entropy, clip fractions
low / high, the fraction of zero-variance groups, response length, and rollout vs update time.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.models import sampling
from components.models.fast_llama import shared_prompt_logprobs, supports
from components.models.logprobs import completion_logprobs
from components.models.precision import precision_autocast
from components.train.backends import local_precision_metrics
from components.train.config import TrainConfig
from components.train.launch import Job, Trained, TrainerJob
from components.train.optim import OptimConfig
from components.train.publish import ModelSaver
from components.train.losses import (
    ADVANTAGE_ESTIMATORS, POLICY_LOSSES, AdvantageEstimator, Aggregation, GroupNorm, KLEstimator, aggregate_loss,
    aggregation_weight, kl_estimate, masked_mean, registered,
)
from components.train.rewards import RewardSpec, Scores, check_errors, score
from components.train.rl import (
    HeldoutSettings, RLSetup, RunningTotals, heldout_scorer, load_rl_setup, produce_rl, run_rl, step_grad_norm,
    summarize_rl,
)

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
    advantage_estimator: AdvantageEstimator = Field("grpo", description=(
        "grpo: reward minus its group's mean, scaled as advantage_normalization says (Shao et al. 2024); rloo: "
        "reward minus the mean of the group's other samples, not scaled (Ahmadian et al. 2024)."))
    advantage_normalization: GroupNorm = Field("group_std", description="The grpo estimator's scaling.")
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
    rollout_precision: Literal["fp32", "bf16", "train"] = Field("fp32", description=(
        "The sampler's arithmetic: fp32; bf16: autocast; train: the update's (train.precision as resolved). "
        "benchmarks/rollout_precision.md (SmolLM2-135M): an fp32 sampler matches an fp32 update to 2.6e-6 per token "
        "(mean |ratio - 1|); with a bf16 update the mismatch is 2.6e-2 (fp32 sampler) or 2.9e-2 (bf16 sampler), "
        "the bf16 sampler being 1.8x faster, so bf16 training samples in bf16 (the real chain) and fp32 training in "
        "fp32 (this default). The update recomputes the old log-probs itself either way."))

    hash_omits_at_default: ClassVar[tuple[str, ...]] = (
        "max_reward_error_fraction", "advantage_estimator", "rollout_precision")


@dataclass
class Round:
    """One rollout round: `group_size` scored completions for each of its prompts."""

    rollout: sampling.Rollout
    rewards: torch.Tensor  # [prompts * group_size], a group's samples consecutive
    scores: Scores

    def zero_variance(self, group_size: int) -> torch.Tensor:
        """[prompts] True where every reward of the group agrees (no signal)."""
        grouped = self.rewards.view(-1, group_size)
        return grouped.max(dim=1).values == grouped.min(dim=1).values


class Chunk:
    """Rows of one rollout round that go into the update, with their advantages."""

    def __init__(self, rollout: sampling.Rollout, rows: list[int], advantages: torch.Tensor) -> None:
        self.input_ids = rollout.input_ids[rows]
        self.attention_mask = rollout.attention_mask[rows]
        self.completion_mask = rollout.completion_mask[rows]
        self.prompt_width = rollout.prompt_width
        self.advantages = advantages  # [rows]


@dataclass
class Batch:
    """What a step trains on: the kept groups of every round, in chunks, and the scores of
    every round sampled for it (refills included, for the reward-error check)."""

    chunks: list[Chunk]
    scores: Scores
    rounds: int
    groups: int


Piece = tuple[Chunk, slice]  # the rows of a chunk that one micro-batch update takes


def fill_batch(config: GRPOConfig, first: Round, next_round: Callable[[], Round]) -> Batch:
    """Up to `batch_size_rows` groups from `first` and, with dynamic sampling (DAPO §3.2), from
    refill rounds (`next_round`, at most `max_sampling_rounds` rounds in all), dropping groups
    whose rewards all agree; each chunk's advantages by the configured estimator over its round."""
    estimator = registered(ADVANTAGE_ESTIMATORS, config.advantage_estimator, "grpo.advantage_estimator")
    group, wanted = config.group_size, config.train.batch_size_rows
    current, scores, chunks, kept_groups, rounds = first, first.scores, [], 0, 1
    while True:
        zero_variance = current.zero_variance(group)
        keep = [g for g in range(zero_variance.shape[0]) if not (config.dynamic_sampling and zero_variance[g])]
        keep = keep[:wanted - kept_groups]
        if keep:
            rows = [g * group + j for g in keep for j in range(group)]
            advantages = estimator(current.rewards, group, config.advantage_normalization)[rows]
            chunks.append(Chunk(current.rollout, rows, advantages))
            kept_groups += len(keep)
        if kept_groups >= wanted or rounds >= config.max_sampling_rounds or not config.dynamic_sampling:
            return Batch(chunks, scores, rounds, kept_groups)
        rounds += 1
        current = next_round()
        scores = scores.merge(current.scores)


def round_metrics(first: Round, group_size: int) -> dict[str, Any]:
    """A step's reward and sampling metrics, from its first rollout round."""
    rewards, rollout = first.rewards, first.rollout
    return {
        "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
        **{f"reward/{name}": sum(values) / len(values) for name, values in first.scores.per_function.items()},
        "zero_variance_fraction": float(first.zero_variance(group_size).float().mean()),
        "response_length": float(rollout.completion_mask.sum(1).mean()),
        "finished_fraction": sum(rollout.finished) / len(rollout.finished),
    }


def pieces_of(chunks: list[Chunk], rows_per_piece: int) -> list[Piece]:
    """The chunks cut into update pieces of at most `rows_per_piece` rows (whole groups)."""
    return [(chunk, slice(start, start + rows_per_piece))
            for chunk in chunks for start in range(0, chunk.input_ids.shape[0], rows_per_piece)]


@dataclass(frozen=True)
class BatchSize:
    """The whole batch's response tokens and sequences, and Dr. GRPO's constant (Liu et al.
    2025, eq. 3: max_new_tokens x sequences), that each piece's loss is weighted against."""

    tokens: float
    rows: int
    constant: int

    @classmethod
    def of(cls, pieces: list[Piece], generated_tokens_per_row: int) -> BatchSize:
        rows = sum(c.completion_mask[r].shape[0] for c, r in pieces)
        return cls(sum(float(c.completion_mask[r].sum()) for c, r in pieces), rows, generated_tokens_per_row * rows)


class GRPOStep(RunningTotals):
    """`run_rl`'s step function: each call is one step (rollout, fill the batch, update). It
    counts reward failures and training FLOPs over the run."""

    def __init__(self, config: GRPOConfig, setup: RLSetup, reference: Any, backend: Any, sampler: Any) -> None:
        self.config, self.setup, self.reference = config, setup, reference
        self.backend, self.sampler, self.device = backend, sampler, backend.device
        self.rollout_precision = backend.precision if config.rollout_precision == "train" else config.rollout_precision
        self.shared_prompt = supports(setup.policy)
        self.policy_loss = POLICY_LOSSES["ppo_clip"]
        self.generated_tokens_per_row = config.max_new_tokens  # Dr. GRPO's constant: the most a row can sample

    def __call__(self, step_index: int, indices: torch.Tensor, learning_rate: float) -> dict[str, Any]:
        config, started = self.config, time.perf_counter()
        first = self.rollout(indices.tolist())
        record = round_metrics(first, config.group_size)
        batch = fill_batch(config, first, lambda: self.rollout(self.sampler.next_batch().tolist()))
        record.update({"sampling_rounds": batch.rounds, "groups_trained": batch.groups,
                       **({"reward_error_examples": batch.scores.error_examples} if batch.scores.errors else {})})
        check_errors(batch.scores, "grpo", step_index + 1, config.max_reward_error_fraction)
        micro_prompts = config.train.micro_batch_rows or config.train.batch_size_rows
        pieces = pieces_of(batch.chunks, micro_prompts * config.group_size)
        ref_logprobs = self.reference_logprobs(pieces)
        rollout_time_s = time.perf_counter() - started
        update_started = time.perf_counter()
        sums, grad_norms = self.update(pieces, ref_logprobs, learning_rate)
        record.update(sums if pieces else {"loss": None})
        if self.reference is None:
            record["kl"] = None
        record.update({
            "grad_norm": step_grad_norm(grad_norms), "updates": len(grad_norms),
            "rollout_time_s": rollout_time_s, "update_time_s": time.perf_counter() - update_started,
            "reward_errors": self.reward_errors, "training_flops": self.training_flops,
        })
        return record

    def rollout(self, indices: list[int]) -> Round:
        """Sample `group_size` completions for each prompt of `indices` and score them."""
        config, setup, group = self.config, self.setup, self.config.group_size
        with precision_autocast(self.device.type, self.rollout_precision):
            rollout = sampling.decode(setup.policy, setup.tokenizer, [setup.encoded[i] for i in indices], group,
                                      config.max_new_tokens, config.temperature)
        references = [setup.problems[i][1] for i in indices for _ in range(group)]
        scores = score(config.rewards, rollout.texts, references, config.on_reward_error)
        self.reward_errors += scores.errors
        prompt_tokens = int(rollout.attention_mask[:, :rollout.prompt_width].sum()) // group
        self.training_flops += setup.forward_flops_per_token * (prompt_tokens + float(rollout.completion_mask.sum()))
        return Round(rollout, torch.tensor(scores.total), scores)

    def reference_logprobs(self, pieces: list[Piece]) -> list[torch.Tensor] | None:
        """The frozen reference's log-probs of each piece (None without a KL term)."""
        if self.reference is None:
            return None
        logprobs = []
        with torch.no_grad():
            for chunk, rows in pieces:
                piece_logprobs, _, _ = completion_logprobs(
                    self.reference, chunk.input_ids[rows].to(self.device), chunk.attention_mask[rows].to(self.device),
                    chunk.prompt_width, self.config.temperature)
                logprobs.append(piece_logprobs)
                self.training_flops += self.setup.forward_flops_per_token * float(chunk.attention_mask[rows].sum())
        return logprobs

    def update(self, pieces: list[Piece], ref_logprobs: list[torch.Tensor] | None,
               learning_rate: float) -> tuple[dict[str, float], list[float]]:
        """`iterations` optimizer steps on the batch, each accumulating every piece's gradient;
        returns the step's loss statistics and the optimizer steps' gradient norms. The first
        iteration's log-probs are the sampling policy's (these weights, before any update)."""
        size = BatchSize.of(pieces, self.generated_tokens_per_row)
        sums = dict.fromkeys(("loss", "kl", "entropy", "clip_fraction_low", "clip_fraction_high"), 0.0)
        old_logprobs: list[torch.Tensor] = []
        grad_norms: list[float] = []
        for iteration in range(self.config.iterations if pieces else 0):
            for index, piece in enumerate(pieces):
                terms, old = self.piece_backward(piece, size, old_logprobs[index] if iteration else None,
                                                 ref_logprobs[index] if ref_logprobs is not None else None)
                if iteration == 0:
                    old_logprobs.append(old)
                for name, value in terms.items():
                    sums[name] += value
            grad_norms.append(self.backend.optimizer_step(learning_rate))
            if not math.isfinite(grad_norms[-1]):
                break  # the optimizer did not step; run_rl stops the run on this step's grad_norm
        return sums, grad_norms

    def piece_backward(self, piece: Piece, size: BatchSize, old: torch.Tensor | None,
                       ref: torch.Tensor | None) -> tuple[dict[str, float], torch.Tensor]:
        """Backward of one piece's loss, weighted by its share of the batch (`old` None: the
        first iteration, whose log-probs become the old ones); returns its contributions to the
        step's statistics and the old log-probs."""
        config, (chunk, rows) = self.config, piece
        mask = chunk.completion_mask[rows].to(self.device)
        tokens = float(mask.sum())
        weight = aggregation_weight(config.loss_aggregation, tokens, mask.shape[0], size.tokens, size.rows)
        with precision_autocast(self.device.type, self.backend.precision):
            logprobs, entropies = self.group_logprobs(chunk, rows, old is None)
        old = logprobs.detach() if old is None else old
        advantages = chunk.advantages[rows].to(self.device)[:, None].expand_as(logprobs)
        loss, stats = self.policy_loss(logprobs, old, advantages, mask, config.eps_low, config.eps_high,
                                       config.dual_clip, config.loss_aggregation, size.constant)
        terms = {}
        if ref is not None:
            kl = kl_estimate(logprobs, ref, config.kl_estimator)
            loss = loss + config.kl_coef * aggregate_loss(kl, mask, config.loss_aggregation, size.constant)
            terms["kl"] = float(masked_mean(kl.detach(), mask)) * tokens / size.tokens / config.iterations
        (loss * weight).backward()
        terms["loss"] = float(loss.detach()) * weight / config.iterations
        for name in ("clip_fraction_low", "clip_fraction_high"):
            terms[name] = float(stats[name]) * tokens / size.tokens / config.iterations
        if entropies is not None:
            terms["entropy"] = float(masked_mean(entropies, mask)) * tokens / size.tokens
        prompt_tokens = float(chunk.attention_mask[rows, :chunk.prompt_width].sum())
        completion_tokens = float(chunk.completion_mask[rows].sum())
        self.training_flops += self.setup.training_flops_per_token * (
            prompt_tokens / (config.group_size if self.shared_prompt else 1) + completion_tokens)
        return terms, old

    def group_logprobs(self, chunk: Chunk, rows: slice, entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of a piece's completions: each prompt run once for its group (Llama), or
        every row as prompt + completion through the model's own forward."""
        config, device, policy = self.config, self.device, self.setup.policy
        ids, mask, width = chunk.input_ids[rows].to(device), chunk.attention_mask[rows].to(device), chunk.prompt_width
        if self.shared_prompt:
            group = config.group_size
            return shared_prompt_logprobs(policy, ids[::group, :width], mask[::group, :width], ids[:, width:],
                                          chunk.completion_mask[rows].to(device), config.temperature, entropy)
        logprobs, entropies, _ = completion_logprobs(policy, ids, mask, width, config.temperature, entropy=entropy)
        return logprobs, entropies


def fit(job: Job) -> Trained:
    config = job.config
    setup = load_rl_setup(job.paths, config)
    tokenizer, policy = setup.tokenizer, setup.policy
    reference = copy.deepcopy(policy).eval().requires_grad_(False) if config.kl_coef > 0 else None
    records = run_rl(policy, policy, tokenizer, config.train, len(setup.problems), job.run_dir,
                     make_step=functools.partial(GRPOStep, config, setup, reference),
                     save_model=ModelSaver(tokenizer, model=""), scorer=heldout_scorer(setup, config, job.run_dir),
                     score_every_steps=config.heldout.every_steps, final_dir=job.out_dir, description="grpo")
    precision = local_precision_metrics(config.train)
    rollout_precision = precision["precision"] if config.rollout_precision == "train" else config.rollout_precision
    return Trained(0, lambda: {**summarize_rl(job.run_dir, records), **precision,
                               "rollout_precision": rollout_precision})


train_job = TrainerJob(GRPOConfig, fit)


def grpo(config: GRPOConfig, model: str, problems: str, dest: str, heldout: str | None = None,
         overwrite: bool = False) -> Manifest:
    """Train `model` (an SFT model artifact) by GRPO on `problems` (GSM8K-format jsonl); score
    greedy accuracy on `heldout` problems before, during and after. `heldout` is for monitoring
    and tuning (the pipeline passes the task's validation split), never the reported test set."""
    inputs = {"model": model, "problems": problems, **({"heldout": heldout} if heldout else {})}
    return produce_rl(SPEC, "grpo", "GRPO", config, inputs, dest, overwrite)
