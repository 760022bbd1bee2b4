"""The run every trainer drives, supervised (`engine.train`) or RL (`rl.run_rl`): what happens
around the steps, in one place.

Invariant: a run is a pure function of its config, its data and its seed, whether it goes
straight through or is killed and resumed from any checkpoint. Python's and torch's
generators are seeded before the backend is built, the checkpoint restores every generator
and the sampler position, and the step log and evaluation log are cut back to the resumed
step, so a resumed run writes the same weights, records and files as an uninterrupted one.

A `Run` owns
- seeding, building the backend and sampler, and resume: the latest complete checkpoint (or
  `resume_from`), pruning checkpoints of another history and partial saves; a finished run
  (`COMPLETED`) starts afresh;
- the learning-rate schedule and the per-step finite check (`TrainingDivergedError`);
- the step log (`metrics.jsonl`), an optional evaluation hook (RL's held-out accuracy: after
  the resume, every k steps and at the end), and the checkpoint cadence; a driver whose step
  keeps state of its own across steps (an RL step's running totals) hands it over with
  `keep_step_state`, and checkpoints carry it;
- finishing: the model saved with full parameters, `weights-rankN.sha256`, `COMPLETED`.

The driver supplies the step: `loop(step_record)` calls `step_record(step)` for each
remaining optimizer step (counted from 0) and logs the record it returns.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from components.errors import CrucibleError
from components.runlog import STEP_LOG_FILE, log_step, read_metrics, write_records
from components.train.batches import EpochSampler
from components.train.checkpoints import (
    CHECKPOINTS_DIR, checkpoint_steps, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint,
    weights_digest,
)
from components.train.optim import lr_multiplier

if TYPE_CHECKING:
    import torch

    from components.train.backends import Backend
    from components.train.config import TrainConfig

COMPLETED_FILE = "COMPLETED"

class TrainingDivergedError(CrucibleError):
    """A loss or gradient norm became NaN or infinite; the message names the step and the last good
    checkpoint."""


@dataclass(frozen=True)
class Evaluation:
    """A score the run logs beside its steps: `score(step)` appends one record for `step` to
    `run_dir / log_file`. It is taken after the resume, every `every_steps` steps (0: never)
    before the last, and at the end; a resume cuts its log back like the step log."""

    score: Callable[[int], None]
    log_file: str
    every_steps: int = 0


class StatefulStep(Protocol):
    """A step function with state of its own across steps, as JSON numbers."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _due(done: int, every: int) -> bool:
    return bool(every) and done % every == 0


class Run:
    """One training run in `run_dir`; build it with `Run.start`."""

    def __init__(self, config: TrainConfig, run_dir: Path, description: str, backend: Backend, sampler: EpochSampler,
                 save_model: Callable[[torch.nn.Module, Path], None], evaluation: Evaluation | None) -> None:
        self.config, self.run_dir, self.description = config, run_dir, description
        self.backend, self.sampler, self.save_model, self.evaluation = backend, sampler, save_model, evaluation
        self.start_step, self.resumed_from, self.last_good = 0, None, None
        self.resumed_step_state: dict[str, Any] = {}
        self.step_state: StatefulStep | None = None
        self.records: list[dict[str, Any]] = []
        self._started = time.perf_counter()

    @classmethod
    def start(cls, config: TrainConfig, run_dir: Path, description: str, *, build_backend: Callable[[], Backend],
              num_rows: int, save_model: Callable[[torch.nn.Module, Path], None],
              rows_source: str = "the training data", evaluation: Evaluation | None = None) -> Run:
        """Seed, build the backend, then the sampler over `num_rows` rows, and resume."""
        import torch

        random.seed(config.seed)
        torch.manual_seed(config.seed)
        backend = build_backend()  # after seeding: its initialisation may draw
        sampler = EpochSampler(num_rows, config.batch_size_rows, config.seed, rows_source)
        run = cls(config, run_dir, description, backend, sampler, save_model, evaluation)
        run._resume()
        return run

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / CHECKPOINTS_DIR

    def _resume(self) -> None:
        """Continue from the latest complete checkpoint (or `resume_from`); keep the logs up to
        its step; drop checkpoints of another history; then take the first evaluation."""
        config, backend, root = self.config, self.backend, self.checkpoint_root
        if backend.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            self._forget_finished_run()
        backend.barrier()
        source = Path(config.resume_from) if config.resume_from else None
        if source is None and config.resume:
            source = latest_checkpoint(root)
        if source is not None:
            self.start_step, self.resumed_step_state = load_checkpoint(backend, self.sampler, source)
            self.resumed_from = self.start_step
        if backend.rank == 0:
            logs = [STEP_LOG_FILE] + ([self.evaluation.log_file] if self.evaluation else [])
            for log in logs:
                path = self.run_dir / log
                write_records(path, [r for r in read_metrics(path) if r["step"] <= self.start_step])
            prune_checkpoints(root, self.start_step)
        self.last_good = latest_checkpoint(root)
        if self.evaluation:
            self.evaluation.score(self.start_step)

    def _forget_finished_run(self) -> None:
        """A finished run's checkpoints are kept for inspection, but a rebuild (--rebuild)
        starts afresh rather than resuming near the end of the old run."""
        marker = self.run_dir / COMPLETED_FILE
        if marker.exists():
            shutil.rmtree(self.checkpoint_root, ignore_errors=True)
            self.checkpoint_root.mkdir(parents=True, exist_ok=True)
            marker.unlink()

    def keep_step_state(self, step: StatefulStep) -> None:
        """Restore `step`'s state from the checkpoint this run resumed from, and save it with
        every checkpoint from now on: without it a resumed RL run would count its training
        FLOPs and reward failures from the resume, not from step 1."""
        step.load_state_dict(self.resumed_step_state)
        self.step_state = step

    def learning_rate(self, step: int) -> float:
        return self.config.optim.learning_rate * lr_multiplier(step, self.config.max_steps, self.config.optim)

    def check_finite(self, step: int, name: str, value: float, detail: str = "") -> None:
        """Stop the run at the first non-finite `value` (a loss, a gradient norm) of `step`,
        before the optimizer applies it, naming the last good checkpoint to resume from."""
        if math.isfinite(value):
            return
        self.backend.discard_gradients()
        where = f"last good checkpoint: {self.last_good}" if self.last_good else "no checkpoint was written before it"
        raise TrainingDivergedError(f"{self.description}: {name} became {value} at step {step + 1}{detail}; "
                                    f"stopped ({where})")

    def elapsed_s(self) -> float:
        """Seconds since the loop started."""
        return time.perf_counter() - self._started

    def loop(self, step_record: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
        """Run the remaining steps; returns this process's step records."""
        self._started = time.perf_counter()
        for step in range(self.start_step, self.config.max_steps):
            self._end_step(step, step_record(step))
        return self.records

    def _end_step(self, step: int, record: dict[str, Any]) -> None:
        self.records.append(record)
        if self.backend.rank == 0:
            log_step(self.run_dir / STEP_LOG_FILE, record, self.description, self.config.max_steps)
        done = step + 1
        if done == self.config.max_steps:
            return
        if self.evaluation and _due(done, self.evaluation.every_steps):
            self.evaluation.score(done)
        if _due(done, self.config.checkpoint_every_steps):
            self.last_good = save_checkpoint(self.backend, self.sampler, done, self.checkpoint_root,
                                             self.save_model, self.config.keep_last_checkpoints,
                                             self.step_state.state_dict() if self.step_state else None)

    def finish(self, final_dir: Path | None) -> None:
        """The last evaluation; the model into `final_dir` (rank 0, full parameters under
        ZeRO-3); this rank's weights digest; then, once every rank is done, `COMPLETED`."""
        backend = self.backend
        if self.evaluation:
            self.evaluation.score(self.config.max_steps)
        with backend.gathered_parameters():
            digest = weights_digest(backend.module)
            if final_dir is not None and backend.rank == 0:
                self.save_model(backend.module, final_dir)
        (self.run_dir / f"weights-rank{backend.rank}.sha256").write_text(digest + "\n", encoding="utf-8")
        backend.barrier()
        if backend.rank == 0:
            (self.run_dir / COMPLETED_FILE).write_text(json.dumps({"steps": self.config.max_steps}) + "\n",
                                                       encoding="utf-8")

    def checkpoints(self) -> list[str]:
        """The run's complete checkpoints, oldest first."""
        return [str(path) for _, path in checkpoint_steps(self.checkpoint_root)]
