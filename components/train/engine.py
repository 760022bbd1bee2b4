"""The one training loop every trainer uses: in one process (plain torch) or on every rank
of a `deepspeed` launch (ZeRO 0-3), with the same batches, loss normalisation, learning-rate
schedule, checkpoints and metrics either way.

A trainer hands over
- a *loss module*: an `nn.Module` whose `forward(**micro_batch)` returns the **sum** of its
  per-token losses (a scalar tensor), or `(sum, {name: sum})` with extra quantities to log;
  its trainable parameters are what gets optimised;
- `TrainData`: tensors with one row per sequence (packed blocks or padded examples) or per
  preference pair, and what a loss unit is (a next-token position, or a pair);
- a `save_model(module, directory)` callback that writes the model in its published format
  (HF `save_pretrained`, a LoRA adapter, a soft prompt).

Each optimizer step consumes one *global batch* of `batch_size_rows` rows, the same rows on
every rank in the same order; rank r takes its share as micro-batches. The loss is the
token-weighted mean over the whole global batch: each micro-batch's loss sum is divided by
the global batch's count of loss tokens, so gradient accumulation and data parallelism give
the same gradient as one big batch (the normalisation HF transformers adopted in 4.46 with
`num_items_in_batch`, instead of averaging per-micro-batch means).

Checkpoints (every `checkpoint_every_steps`, the last `keep_last_checkpoints` kept) hold the
model in its published format, the optimizer (or DeepSpeed's partitioned states), the step,
the sampler position and every rank's RNG state, so a resumed run continues with exactly the
batches and random numbers the interrupted one would have used. A checkpoint directory is
written under a temporary name and renamed when complete, so a kill never leaves a
half-written checkpoint that looks valid.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from components.config import StrictConfig
from components.errors import ConfigError, CrucibleError, DataError
from components.models.chat import IGNORE_INDEX
from components.locks import exclusive
from components.runlog import STEP_LOG_FILE, log_step, read_metrics
from components.train.loop import OptimConfig, lr_multiplier, make_optimizer

if TYPE_CHECKING:
    import torch

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
COMPLETED_FILE = "COMPLETED"
SHAPES_FILE = "shapes.json"
MODEL_DIR = "model"


class TrainingDivergedError(CrucibleError):
    """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class DistributedConfig(StrictConfig):
    launcher: Literal["none", "deepspeed"] = Field(
        "none", description="none: this process (plain torch); deepspeed: the `deepspeed` launcher starts the ranks.",
    )
    num_procs: int | None = Field(
        None, ge=1, description="Ranks per node for the deepspeed launcher; default: the estimate's num_gpus, else 1.",
    )
    hostfile: str | None = Field(None, description="DeepSpeed hostfile for multi-node runs.")
    node_rank: int | None = Field(
        None, ge=0, description="With a hostfile: start only this node's ranks, without ssh (DeepSpeed --no_ssh); "
                                "run the stage once per node with its node_rank (one pod or Slurm task per node).")
    master_addr: str | None = Field(None, description="Address of the hostfile's first node (with node_rank); "
                                                      "default 127.0.0.1.")
    master_port: int | None = Field(None, ge=1024, le=65535, description="Default: a free port.")
    deepspeed_config: dict[str, Any] | None = Field(
        None, description="A DeepSpeed config; default: the feasibility estimate's recommended `deepspeed_config`.",
    )


class TrainConfig(StrictConfig):
    optim: OptimConfig = OptimConfig()
    max_steps: int = Field(100, gt=0, description="Optimizer steps.")
    batch_size_rows: int = Field(16, gt=0, description="Rows (packed blocks or examples) per optimizer step, all ranks.")
    micro_batch_rows: int | None = Field(
        None, gt=0, description="Rows per forward pass per rank; default: the DeepSpeed config's, else the whole share.",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a CUDA device that supports it, fp32 otherwise.",
    )
    gradient_checkpointing: bool = False
    checkpoint_every_steps: int = Field(100, ge=0, description="0 disables intermediate checkpoints.")
    keep_last_checkpoints: int = Field(2, ge=1)
    resume: bool = Field(True, description="Continue from this run's latest checkpoint if one exists.")
    resume_from: str | None = Field(None, description="A checkpoint directory to continue from instead.")
    seed: int = 0
    peak_tflops: float | None = Field(None, gt=0, description="Device peak for MFU; default: the hardware catalog's.")
    distributed: DistributedConfig = DistributedConfig()

    @model_validator(mode="after")
    def _warmup_fits(self) -> "TrainConfig":
        """A warmup longer than the run stops the linear ramp at max_steps / warmup_steps of the
        peak (`lr_multiplier`), so the configured learning rate would silently never be used."""
        warmup = self.optim.warmup_steps
        if warmup > self.max_steps:
            default = "" if "warmup_steps" in self.optim.model_fields_set else ", the default"
            raise ValueError(
                f"optim.warmup_steps ({warmup}{default}) exceeds max_steps ({self.max_steps}): the learning rate "
                f"would peak at {self.max_steps}/{warmup} of optim.learning_rate ({self.optim.learning_rate:g}); "
                "set optim.warmup_steps <= max_steps")
        return self


# --------------------------------------------------------------------------- data


@dataclass
class TrainData:
    """Rows of tensors with one row per example along dim 0 (`input_ids`, `labels`, optionally
    `position_ids`, ...; preference pairs carry `chosen_*` / `rejected_*` columns instead).

    `loss_units(batch)` counts what the loss module's sum is a sum over (next-token positions
    by default; pairs for a preference loss): the loop divides by the global batch's count.
    `real_tokens(batch)` counts the non-padding tokens a throughput figure reports.
    """

    columns: dict[str, torch.Tensor]
    pad_token_id: int | None = None
    source: str = "dataset"
    required: tuple[str, ...] = ("input_ids", "labels")
    loss_units: Callable[[dict[str, torch.Tensor]], int] | None = None
    real_tokens: Callable[[dict[str, torch.Tensor]], int] | None = None

    def __post_init__(self) -> None:
        missing = [name for name in self.required if name not in self.columns]
        if missing:
            raise DataError(f"{self.source}: training data needs {' and '.join(self.required)}, has {sorted(self.columns)}")
        rows = {name: int(tensor.shape[0]) for name, tensor in self.columns.items()}
        if len(set(rows.values())) != 1:
            raise DataError(f"{self.source}: columns differ in row count: {rows}")
        if "input_ids" in self.columns and "labels" in self.columns and \
                self.columns["input_ids"].shape != self.columns["labels"].shape:
            raise DataError(f"{self.source}: columns differ in shape: input_ids {tuple(self.columns['input_ids'].shape)}"
                            f" vs labels {tuple(self.columns['labels'].shape)}")
        if len(self) == 0:
            raise DataError(f"{self.source}: the dataset is empty")
        if self.loss_units is None:
            if int((self.columns["labels"][:, 1:] != IGNORE_INDEX).sum()) == 0:
                raise DataError(f"{self.source}: no row has a token to train on (every label is {IGNORE_INDEX})")
            self.loss_units = count_loss_tokens
        if self.real_tokens is None:
            self.real_tokens = functools.partial(count_real_tokens, pad_token_id=self.pad_token_id)

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    @property
    def width(self) -> int:
        return int(self.columns[self.required[0]].shape[-1])

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor[indices] for name, tensor in self.columns.items()}


class EpochSampler:
    """Global batches from a fresh seeded permutation each epoch; the state is (epoch, cursor).

    The permutation of epoch e depends only on (seed, e), so restoring (epoch, cursor)
    reproduces the remaining batches exactly. The tail that does not fill a batch is dropped.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        if num_rows < batch_size:
            raise ConfigError(f"batch_size_rows ({batch_size}) exceeds the {num_rows} rows of the training data")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._permutation: torch.Tensor | None = None

    def _order(self) -> torch.Tensor:
        import torch

        if self._permutation is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._permutation = torch.randperm(self.num_rows, generator=generator)
        return self._permutation

    def next_batch(self) -> torch.Tensor:
        if self.cursor == self.num_rows // self.batch_size:
            self.epoch, self.cursor, self._permutation = self.epoch + 1, 0, None
        start = self.cursor * self.batch_size
        self.cursor += 1
        return self._order()[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._permutation = int(state["epoch"]), int(state["cursor"]), None


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that contribute to a next-token loss: labels shifted by one, not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_real_tokens(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Non-padding tokens (the "effective" tokens of a throughput figure)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_token_id is None:
        return int(batch["input_ids"].numel())
    return int((batch["input_ids"] != pad_token_id).sum())


# --------------------------------------------------------------------------- devices


def resolve_precision(precision: str, device: torch.device) -> str:
    import torch

    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def peak_flops_per_s(config: TrainConfig, device: torch.device, precision: str) -> float | None:
    """Peak dense FLOP/s of one device, for MFU: the config's, else the hardware catalog's entry
    for this device (`CPU` on a CPU; a catalog name contained in the CUDA device name)."""
    import torch

    from components.feasibility.hardware import load_catalog

    if config.peak_tflops is not None:
        return config.peak_tflops * 1e12
    catalog = load_catalog()
    if device.type == "cpu":
        return catalog["CPU"].peak_flops_per_s(precision)
    name = torch.cuda.get_device_name(device).upper().replace("-", " ")
    # Every part of the catalog name must appear ("H100-PCIE" in "NVIDIA H100 PCIE"); the most
    # specific such entry wins, so L4 never stands in for an L40S and SXM never for PCIe.
    matches = [key for key in catalog if all(part in name.split() or part in name
                                             for part in key.upper().split("-"))
               and precision in catalog[key].peak_tflops]
    exact = [key for key in matches if all(part in name.split() for part in key.upper().split("-"))]
    chosen = max(exact or matches, key=len) if (exact or matches) else None
    return catalog[chosen].peak_flops_per_s(precision) if chosen else None


def peak_memory_gib(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set on a CPU."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


# --------------------------------------------------------------------------- backends


LossAndStats = tuple["torch.Tensor", dict[str, float]]


def split_output(output: Any) -> LossAndStats:
    """A loss module returns its loss sum, or (loss sum, {name: sum over its loss units}) for
    extra quantities to log (a preference loss's reward accuracy, say), averaged like the loss."""
    if isinstance(output, tuple):
        loss_sum, stats = output
        return loss_sum, {name: float(value) for name, value in stats.items()}
    return output, {}


class TorchBackend:
    """This process alone: autocast for bf16 (fp32 master weights), torch clipping and AdamW."""

    rank, world_size = 0, 1

    def __init__(self, module: torch.nn.Module, config: TrainConfig, device: torch.device, precision: str) -> None:
        self.module, self.device, self.precision = module.to(device), device, precision
        self.optimizer = make_optimizer(module, config.optim, fused=True)
        self.grad_clip_norm = config.optim.grad_clip_norm

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last: bool) -> LossAndStats:
        import torch

        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss_sum, stats = split_output(self.module(**batch))
        (loss_sum * scale).backward()
        return loss_sum.detach().float(), stats

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def optimizer_step(self, learning_rate: float) -> float:
        import torch

        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        params = [p for p in self.module.parameters() if p.requires_grad]
        max_norm = self.grad_clip_norm if self.grad_clip_norm is not None else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        if not math.isfinite(grad_norm):
            return grad_norm  # the loop raises before any weight changes
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def save_state(self, directory: Path) -> None:
        import torch

        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")

    def load_state(self, directory: Path) -> None:
        import torch

        load_module_state(self.module, directory / MODEL_DIR / "trainable.pt")
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))

    def gathered_parameters(self):  # noqa: ANN201 - a context manager
        from contextlib import nullcontext

        return nullcontext()

    def barrier(self) -> None:
        pass


class DeepSpeedBackend:
    """One rank of a `deepspeed` launch: DeepSpeed's engine (ZeRO partitioning, gradient
    all-reduce, clipping) around our AdamW, given as DeepSpeed's client optimizer (its fused
    optimizers need CUDA; a torch optimizer runs on CPU ranks as well)."""

    def __init__(self, module: torch.nn.Module, config: TrainConfig, ds_config: dict[str, Any]) -> None:
        import deepspeed

        optimizer = make_optimizer(module, config.optim)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module, self.device = self.engine.module, self.engine.device
        self.rank, self.world_size = self.engine.global_rank, self.engine.world_size
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.precision = ("bf16" if ds_config.get("bf16", {}).get("enabled")
                          else "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last: bool) -> LossAndStats:
        loss_sum, stats = split_output(self.engine(**batch))
        # DeepSpeed averages gradients over ranks; multiplying by the world size turns that
        # average back into the sum our global-token normalisation expects.
        self.engine.backward(loss_sum * (scale * self.world_size), scale_wrt_gas=False)
        if not last:
            self.engine.step()  # a micro-step: DeepSpeed only counts it
        return loss_sum.detach().float(), stats

    def all_reduce_sum(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.to(self.device)
        dist.all_reduce(values)
        return values.cpu()

    def optimizer_step(self, learning_rate: float) -> float:
        import torch

        for group in self.engine.optimizer.param_groups:
            group["lr"] = learning_rate
        before = None
        if self.zero_stage == 0:  # DeepSpeed records no norm without ZeRO; the gradients are plain .grad here
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            before = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.engine.step()
        norm = self.engine.get_global_grad_norm() if before is None else before
        return float(norm) if norm is not None else float("nan")

    def discard_gradients(self) -> None:
        self.engine.zero_grad()

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory / "deepspeed"), tag="state")

    def load_state(self, directory: Path) -> None:
        # DeepSpeed's checkpoint holds the module weights (every partition) and the optimizer.
        path, _ = self.engine.load_checkpoint(str(directory / "deepspeed"), tag="state")
        if path is None:
            raise CrucibleError(f"{directory}: DeepSpeed found no checkpoint to load")

    def gathered_parameters(self):  # noqa: ANN201 - a context manager
        """Under ZeRO-3 every rank holds a slice of each weight; gather full weights to save them."""
        from contextlib import nullcontext

        import deepspeed

        if self.zero_stage != 3:
            return nullcontext()
        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


def deepspeed_config_for(config: TrainConfig, estimate_ds_config: dict[str, Any] | None, world_size: int) -> dict[str, Any]:
    """The run's DeepSpeed config: the trainer config's, else the estimate's recommended one,
    with batch sizes and clipping made to agree with the trainer config."""
    base = config.distributed.deepspeed_config or estimate_ds_config
    if base is None:
        base = {"zero_optimization": {"stage": 0}}
    ds = json.loads(json.dumps(base))
    micro = config.micro_batch_rows or ds.get("train_micro_batch_size_per_gpu") or config.batch_size_rows // world_size
    if config.batch_size_rows % (micro * world_size):
        raise ConfigError(
            f"batch_size_rows ({config.batch_size_rows}) is not a multiple of micro_batch_rows ({micro}) x "
            f"{world_size} ranks"
        )
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = config.batch_size_rows // (micro * world_size)
    ds["train_batch_size"] = config.batch_size_rows
    ds["gradient_clipping"] = config.optim.grad_clip_norm or 0.0
    precision = config.precision
    if precision == "auto":
        import torch

        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and not ds.get("fp16", {}).get("enabled"):
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    ds.pop("optimizer", None)  # ours (AdamW with decoupled weight decay on matrices) is passed in
    ds.pop("scheduler", None)  # the loop sets the learning rate itself
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


# --------------------------------------------------------------------------- checkpoints


def _parameter_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    shapes = {}
    for name, param in module.named_parameters():
        shape = getattr(param, "ds_shape", None) or param.shape  # ZeRO-3 keeps the full shape in ds_shape
        shapes[name] = list(shape)
    return shapes


def checkpoint_steps(checkpoint_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `checkpoint_root`, oldest first (partial ones are ignored)."""
    if not checkpoint_root.is_dir():
        return []
    found = []
    for entry in checkpoint_root.iterdir():
        if entry.name.startswith("step-") and entry.name[5:].isdigit() and (entry / STATE_FILE).is_file():
            found.append((int(entry.name[5:]), entry))
    return sorted(found)


def check_checkpoint_shapes(checkpoint: Path, module: torch.nn.Module) -> None:
    saved = json.loads((checkpoint / SHAPES_FILE).read_text(encoding="utf-8"))
    current = _parameter_shapes(module)
    problems = [f"{name}: checkpoint {saved.get(name)} vs model {current.get(name)}"
                for name in sorted(set(saved) | set(current)) if saved.get(name) != current.get(name)]
    if problems:
        shown = "; ".join(problems[:4]) + (f"; ... {len(problems) - 4} more" if len(problems) > 4 else "")
        raise ConfigError(f"{checkpoint}: the checkpoint is of a different model shape: {shown}")


# --------------------------------------------------------------------------- the loop


@dataclass
class TrainResult:
    records: list[dict[str, Any]]
    resumed_from_step: int | None
    world_size: int
    rank: int
    precision: str
    backend: str
    checkpoints: list[str] = field(default_factory=list)


RNG_FILE = "rng-rank{rank}.json"
LEGACY_RNG_FILE = "rng-rank{rank}.pt"  # a pickle, written before RNG states were JSON; never loaded


class _PythonRng(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int
    internal_state: list[int] = Field(min_length=625, max_length=625)  # MT19937: 624 words, then the position
    gauss_next: float | None


class _NumpyRng(BaseModel):
    model_config = ConfigDict(extra="forbid")
    algorithm: Literal["MT19937"]
    keys: list[int] = Field(min_length=624, max_length=624)  # MT19937's 624 words
    pos: int
    has_gauss: int
    cached_gaussian: float


class RngState(BaseModel):
    """Every generator a step draws from, as plain numbers in JSON: a checkpoint that a user
    can point `resume_from` at is data, never a pickle that runs code when loaded. JSON
    writes floats with their shortest exact repr, so a resume stays bit-identical."""

    model_config = ConfigDict(extra="forbid")
    torch: list[int]  # torch.get_rng_state() bytes
    python: _PythonRng
    numpy: _NumpyRng
    cuda: list[list[int]] | None = None  # one byte state per device


def _rng_state() -> RngState:
    import numpy as np
    import torch

    version, internal_state, gauss_next = random.getstate()
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    cuda = [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return RngState(
        torch=torch.get_rng_state().tolist(),
        python=_PythonRng(version=version, internal_state=list(internal_state), gauss_next=gauss_next),
        numpy=_NumpyRng(algorithm=algorithm, keys=keys.tolist(), pos=pos, has_gauss=has_gauss,
                        cached_gaussian=cached_gaussian),
        cuda=cuda,
    )


def _set_rng_state(state: RngState) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(torch.tensor(state.torch, dtype=torch.uint8))
    random.setstate((state.python.version, tuple(state.python.internal_state), state.python.gauss_next))
    legacy = state.numpy
    np.random.set_state((legacy.algorithm, np.array(legacy.keys, dtype=np.uint32), legacy.pos, legacy.has_gauss,
                         legacy.cached_gaussian))
    if state.cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state.cuda])


def save_rng_state(checkpoint: Path, rank: int) -> None:
    (checkpoint / RNG_FILE.format(rank=rank)).write_text(_rng_state().model_dump_json(), encoding="utf-8")


def load_rng_state(checkpoint: Path, rank: int) -> None:
    """Restore this rank's generators from `checkpoint`; a missing, legacy (pickled) or
    malformed state is refused naming the file and the field."""
    path = checkpoint / RNG_FILE.format(rank=rank)
    if not path.is_file():
        legacy = checkpoint / LEGACY_RNG_FILE.format(rank=rank)
        why = (f"only {legacy.name}, a pickle this version does not load (it could run code); resume from a newer "
               "checkpoint or start afresh") if legacy.exists() else "it is missing"
        raise ConfigError(f"{path}: cannot restore the RNG state of rank {rank}: {why}")
    try:
        state = RngState.model_validate_json(path.read_bytes())
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ConfigError(f"{path}: not an RNG state: {where}: {first['msg']}") from None
    try:
        _set_rng_state(state)
    except (ValueError, TypeError, IndexError, RuntimeError) as error:
        raise ConfigError(f"{path}: not a usable RNG state: {error}") from None


def restore(backend: TorchBackend | DeepSpeedBackend, sampler: EpochSampler, config: TrainConfig,
            run_dir: Path) -> tuple[int, int | None, Path | None]:
    """Continue a run from its latest complete checkpoint (or `resume_from`): weights, optimizer,
    sampler position and RNG states. Returns (start step, the step resumed from or None, the
    last good checkpoint). Keeps the metrics log up to the start step and prunes checkpoints
    of another history and partial saves; a finished run (COMPLETED) starts afresh."""
    rank, world_size = backend.rank, backend.world_size
    checkpoint_root = run_dir / CHECKPOINTS_DIR
    metrics_path = run_dir / STEP_LOG_FILE
    if rank == 0:
        checkpoint_root.mkdir(parents=True, exist_ok=True)
    start_step, resumed_from = 0, None
    completed_marker = run_dir / COMPLETED_FILE
    if rank == 0 and completed_marker.exists():
        # A finished run's checkpoints are kept for inspection, but a rebuild (--rebuild)
        # starts afresh rather than resuming near the end of the old run.
        shutil.rmtree(checkpoint_root, ignore_errors=True)
        checkpoint_root.mkdir(parents=True, exist_ok=True)
        completed_marker.unlink()
    backend.barrier()
    source = Path(config.resume_from) if config.resume_from else None
    if source is None and config.resume:
        complete = checkpoint_steps(checkpoint_root)
        source = complete[-1][1] if complete else None
    if source is not None:
        if not (source / STATE_FILE).is_file():
            raise ConfigError(f"resume_from: {source} is not a checkpoint (no {STATE_FILE})")
        check_checkpoint_shapes(source, backend.module)
        state = json.loads((source / STATE_FILE).read_text(encoding="utf-8"))
        if state["world_size"] != world_size:
            raise ConfigError(f"{source}: written by {state['world_size']} ranks, this run has {world_size}")
        backend.load_state(source)
        sampler.load_state_dict(state["sampler"])
        load_rng_state(source, rank)
        start_step = resumed_from = int(state["step"])
    if rank == 0:
        kept = [json.dumps(r) for r in read_metrics(metrics_path) if r["step"] <= start_step]
        metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        for step_number, stale in checkpoint_steps(checkpoint_root):  # from another history (resume off or resume_from)
            if step_number > start_step:
                shutil.rmtree(stale, ignore_errors=True)
        for partial in checkpoint_root.glob("step-*.partial"):  # a save a kill interrupted
            shutil.rmtree(partial, ignore_errors=True)

    existing = checkpoint_steps(checkpoint_root)
    return start_step, resumed_from, (existing[-1][1] if existing else None)


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
    import torch

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or config.distributed.launcher == "deepspeed"
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    if distributed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=None)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        ds_config = deepspeed_config_for(config, estimate_ds_config, world_size)
        if config.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        backend: TorchBackend | DeepSpeedBackend = DeepSpeedBackend(module, config, ds_config)
        if backend.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2), encoding="utf-8")
        micro_rows = ds_config["train_micro_batch_size_per_gpu"]
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        precision = resolve_precision(config.precision, device)
        micro_rows = config.micro_batch_rows or config.batch_size_rows
        if config.batch_size_rows % micro_rows:
            raise ConfigError(f"batch_size_rows ({config.batch_size_rows}) is not a multiple of micro_batch_rows ({micro_rows})")
        if config.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        backend = TorchBackend(module, config, device, precision)
    rank, world_size = backend.rank, backend.world_size
    if len(data) < config.batch_size_rows:
        raise ConfigError(f"batch_size_rows ({config.batch_size_rows}) exceeds the {len(data)} rows of {data.source}")
    sampler = EpochSampler(len(data), config.batch_size_rows, config.seed)
    checkpoint_root = run_dir / CHECKPOINTS_DIR
    metrics_path = run_dir / STEP_LOG_FILE

    start_step, resumed_from, last_good = restore(backend, sampler, config, run_dir)
    device = backend.device
    precision = backend.precision
    peak = peak_flops_per_s(config, device, precision)
    accumulation = config.batch_size_rows // (micro_rows * world_size)
    share = micro_rows * accumulation
    backend.module.train()
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(start_step, config.max_steps):
        step_started = time.perf_counter()
        indices = sampler.next_batch()
        global_batch = data.rows(indices)
        loss_tokens = max(1, data.loss_units(global_batch))  # a batch of prompts only: zero loss, zero gradient
        real_tokens = data.real_tokens(global_batch)
        mine = {name: tensor[rank * share:(rank + 1) * share] for name, tensor in global_batch.items()}
        loss_sum = torch.zeros((), dtype=torch.float64)
        stat_sums: dict[str, float] = {}
        for micro in range(accumulation):
            batch = {name: tensor[micro * micro_rows:(micro + 1) * micro_rows].to(device) for name, tensor in mine.items()}
            micro_loss, micro_stats = backend.forward_backward(batch, 1.0 / loss_tokens, last=micro == accumulation - 1)
            loss_sum += micro_loss.double().cpu()
            for name, value in micro_stats.items():
                stat_sums[name] = stat_sums.get(name, 0.0) + value
        names = sorted(stat_sums)
        totals = backend.all_reduce_sum(torch.tensor([float(loss_sum)] + [stat_sums[n] for n in names], dtype=torch.float64))
        loss = float(totals[0]) / loss_tokens
        stats = {name: float(total) / loss_tokens for name, total in zip(names, totals[1:].tolist())}
        if not math.isfinite(loss):
            backend.discard_gradients()
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written before it"
            raise TrainingDivergedError(f"{description}: loss became {loss} at step {step + 1}; stopped ({where})")
        learning_rate = config.optim.learning_rate * lr_multiplier(step, config.max_steps, config.optim)
        grad_norm = backend.optimizer_step(learning_rate)
        if not math.isfinite(grad_norm):
            backend.discard_gradients()
            where = f"last good checkpoint: {last_good}" if last_good else "no checkpoint was written before it"
            raise TrainingDivergedError(
                f"{description}: gradient norm became {grad_norm} at step {step + 1} (loss {loss:.4g}); stopped ({where})")
        step_time_s = time.perf_counter() - step_started
        tokens_per_s = real_tokens / step_time_s
        record = {
            "step": step + 1,
            "loss": loss,
            "learning_rate": learning_rate,
            "grad_norm": grad_norm,
            "tokens": real_tokens,
            "loss_tokens": loss_tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (peak * world_size) if peak else None,
            "peak_memory_gib": peak_memory_gib(device),
            "step_time_s": step_time_s,
            "elapsed_s": time.perf_counter() - started,
            "epoch": sampler.epoch,
            **stats,
        }
        records.append(record)
        if rank == 0:
            log_step(metrics_path, record, description, config.max_steps)
        done = step + 1
        if config.checkpoint_every_steps and done % config.checkpoint_every_steps == 0 and done < config.max_steps:
            last_good = save_checkpoint(backend, sampler, done, checkpoint_root, save_model, config.keep_last_checkpoints)
    with backend.gathered_parameters():
        digest = weights_digest(backend.module)
        if final_dir is not None and rank == 0:
            save_model(backend.module, final_dir)
    (run_dir / f"weights-rank{rank}.sha256").write_text(digest + "\n", encoding="utf-8")
    backend.barrier()
    if rank == 0:
        (run_dir / COMPLETED_FILE).write_text(json.dumps({"steps": config.max_steps}) + "\n", encoding="utf-8")
    return TrainResult(
        records=records, resumed_from_step=resumed_from, world_size=world_size, rank=rank, precision=precision,
        backend="deepspeed" if distributed else "torch",
        checkpoints=[str(path) for _, path in checkpoint_steps(checkpoint_root)],
    )


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter's bytes: equal on all ranks of a correct data-parallel run."""
    import hashlib

    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def trainable_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the optimizer updates (all of a full fine-tune; the adapter or the soft prompt otherwise)."""
    return {name: param.detach().cpu().clone() for name, param in module.named_parameters() if param.requires_grad}


def load_module_state(module: torch.nn.Module, path: Path) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.requires_grad:
                if name not in state:
                    raise ConfigError(f"{path}: the checkpoint has no parameter {name}")
                param.copy_(state[name].to(param.device, param.dtype))


def save_checkpoint(
    backend: TorchBackend | DeepSpeedBackend,
    sampler: EpochSampler,
    step: int,
    checkpoint_root: Path,
    save_model: Callable[[torch.nn.Module, Path], None],
    keep_last: int,
) -> Path:
    """Write checkpoint `step-N` (collective under DeepSpeed) and drop all but the last `keep_last`."""
    import torch

    final = checkpoint_root / f"step-{step:08d}"
    partial = checkpoint_root / f"step-{step:08d}.partial"
    if backend.rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        (partial / MODEL_DIR).mkdir(parents=True)
    backend.barrier()
    backend.save_state(partial)  # collective for DeepSpeed: every rank writes its partition
    save_rng_state(partial, backend.rank)
    with backend.gathered_parameters():
        if backend.rank == 0:
            torch.save(trainable_state(backend.module), partial / MODEL_DIR / "trainable.pt")
            save_model(backend.module, partial / MODEL_DIR)
            (partial / SHAPES_FILE).write_text(json.dumps(_parameter_shapes(backend.module)), encoding="utf-8")
    backend.barrier()
    if backend.rank == 0:
        state = {"step": step, "sampler": sampler.state_dict(), "world_size": backend.world_size}
        (partial / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")  # last: marks it complete
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in checkpoint_steps(checkpoint_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final

