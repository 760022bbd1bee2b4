"""The supervised training loop every supervised trainer uses (pretraining, SFT, prompt tuning,
reward models, DPO): in one process (plain torch) or on every rank of a `deepspeed` launch
(ZeRO 0-3), with the same batches, loss normalisation, learning-rate schedule, checkpoints
and metrics either way. Seeding, resume, the finite check, logging, checkpoints and finishing
are the `Run`'s (`components.train.run`), shared with the RL trainers.

A trainer hands over
- a *loss module* (`components.train.backends`): `forward(**micro_batch)` returns the **sum**
  of its per-token losses, or `(sum, {name: sum})` with extra quantities to log;
- `TrainData` (`components.train.batches`): one row per sequence or preference pair;
- a `save_model(module, directory)` callback that writes the model in its published format
  (HF `save_pretrained`, a LoRA adapter, a soft prompt).

Invariant: each optimizer step's loss is the token-weighted mean over its whole global batch
of `batch_size_rows` rows. Every rank sees the same rows in the same order and takes its share
as micro-batches; each micro-batch's loss sum is divided by the global batch's count of loss
tokens, so gradient accumulation and data parallelism give the same gradient as one big
batch (the normalisation HF transformers adopted in 4.46 with `num_items_in_batch`, instead
of averaging per-micro-batch means).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.locks import exclusive
from components.train.backends import DeepSpeedBackend, backend_for, peak_flops_per_s, peak_memory_gib
from components.train.batches import TrainData
from components.train.run import Run

if TYPE_CHECKING:
    import torch

    from components.train.config import TrainConfig


@dataclass
class TrainResult:
    records: list[dict[str, Any]]
    resumed_from_step: int | None
    world_size: int
    rank: int
    precision: str
    precision_reason: str  # why `precision` (`models.precision.choose_precision`); MFU is against its peak
    backend: str
    checkpoints: list[str] = field(default_factory=list)


@exclusive()
def train(
    module: torch.nn.Module,
    data: TrainData,
    config: TrainConfig,
    run_dir: Path,
    *,
    save_model: Callable[[torch.nn.Module, Path], None],
    flops_per_token: float,
    final_dir: Path | None = None,
    estimate_ds_config: dict[str, Any] | None = None,
    description: str = "train",
) -> TrainResult:
    """Run `config.max_steps` optimizer steps of `module` on `data`; resume from `run_dir`.

    The trained model is written with `save_model` into `final_dir` (by rank 0).
    `run_dir` holds the live metrics (`metrics.jsonl`, one record per step) and the
    checkpoints. Under a `deepspeed` launch (the environment has `WORLD_SIZE`) the DeepSpeed
    backend is used, else plain torch. `flops_per_token` is the training FLOPs per token of
    the model (the feasibility estimator's 6N + attention), for MFU. One call at a time per
    process (`components.locks.exclusive`).
    """
    run = Run.start(config, run_dir, description, save_model=save_model, num_rows=len(data), rows_source=data.source,
                    build_backend=functools.partial(backend_for, module, config, run_dir, estimate_ds_config))
    backend = run.backend
    step = SupervisedStep(run, data, backend.micro_batch_rows,
                          config.batch_size_rows // (backend.micro_batch_rows * backend.world_size),
                          peak_flops_per_s(config, backend.device, backend.precision), flops_per_token)
    backend.module.train()
    records = run.loop(step)
    run.finish(final_dir)
    return TrainResult(
        records=records, resumed_from_step=run.resumed_from, world_size=backend.world_size, rank=backend.rank,
        precision=backend.precision, precision_reason=backend.precision_reason, backend="deepspeed" if isinstance(backend, DeepSpeedBackend) else "torch",
        checkpoints=run.checkpoints(),
    )


@dataclass(frozen=True)
class SupervisedStep:
    """One optimizer step of the run per call: this rank's share of the global batch in
    `accumulation` micro-batches of `micro_rows`, then the optimizer at the scheduled rate;
    returns the step's record (loss, throughput, MFU against the devices' peak)."""

    run: Run
    data: TrainData
    micro_rows: int
    accumulation: int
    device_peak_flops_per_s: float | None
    flops_per_token: float

    def __call__(self, step: int) -> dict[str, Any]:
        run, backend = self.run, self.run.backend
        step_started = time.perf_counter()
        global_batch = self.data.rows(run.sampler.next_batch())
        loss_tokens = max(1, self.data.loss_units(global_batch))  # a batch of prompts only: zero loss, zero gradient
        real_tokens = self.data.real_tokens(global_batch)
        loss, stats = self._loss(global_batch, loss_tokens)
        run.check_finite(step, "loss", loss)
        learning_rate = run.learning_rate(step)
        grad_norm = backend.optimizer_step(learning_rate)
        run.check_finite(step, "gradient norm", grad_norm, f" (loss {loss:.4g})")
        step_time_s = time.perf_counter() - step_started
        tokens_per_s = real_tokens / step_time_s
        peak = self.device_peak_flops_per_s
        return {
            "step": step + 1,
            "loss": loss,
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens": real_tokens,
            "loss_tokens": loss_tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / (peak * backend.world_size) if peak else None,
            "peak_memory_gib": peak_memory_gib(backend.device),
            "step_time_s": step_time_s,
            "elapsed_s": run.elapsed_s(),
            "epoch": run.sampler.epoch,
            **stats,
        }

    def _loss(self, global_batch: dict[str, torch.Tensor], loss_tokens: int) -> tuple[float, dict[str, float]]:
        """Forward and backward over this rank's micro-batches, each scaled by 1 / the global
        batch's loss tokens; returns the global batch's mean loss and extra stats (all ranks)."""
        import torch

        backend, rows = self.run.backend, self.micro_rows
        share = rows * self.accumulation
        mine = {name: tensor[backend.rank * share:(backend.rank + 1) * share] for name, tensor in global_batch.items()}
        loss_sum = torch.zeros((), dtype=torch.float64)
        stat_sums: dict[str, float] = {}
        for micro in range(self.accumulation):
            batch = {name: tensor[micro * rows:(micro + 1) * rows].to(backend.device) for name, tensor in mine.items()}
            micro_loss, micro_stats = backend.forward_backward(batch, 1.0 / loss_tokens,
                                                               last=micro == self.accumulation - 1)
            loss_sum += micro_loss.double().cpu()
            for name, value in micro_stats.items():
                stat_sums[name] = stat_sums.get(name, 0.0) + value
        names = sorted(stat_sums)
        totals = backend.all_reduce_sum(torch.tensor([float(loss_sum)] + [stat_sums[n] for n in names],
                                                     dtype=torch.float64))
        loss = float(totals[0]) / loss_tokens
        return loss, {name: float(total) / loss_tokens for name, total in zip(names, totals[1:].tolist())}
