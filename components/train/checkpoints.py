"""Checkpoints of a run: `checkpoints/step-XXXXXXXX/` holds the model in its published format
(`model/`, plus `model/trainable.pt`), the optimizer (`optimizer.pt`, or DeepSpeed's
partitioned states), the parameter shapes, every rank's RNG state (`rng-rankN.json`) and,
written last, `trainer_state.json` (step, sampler position, world size).

Invariant: a directory named `step-N` with a `trainer_state.json` is complete. A checkpoint
is written under `step-N.partial` and renamed when complete, so a kill never leaves a
half-written checkpoint that looks valid; restoring one gives exactly the batches and random
numbers the interrupted run would have used.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from components.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from components.train.backends import Backend
    from components.train.batches import EpochSampler

CHECKPOINTS_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
SHAPES_FILE = "shapes.json"
MODEL_DIR = "model"
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
    backend: Backend,
    sampler: EpochSampler,
    step: int,
    checkpoint_root: Path,
    save_model: Callable[[torch.nn.Module, Path], None],
    keep_last: int,
    step_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint `step-N` (collective under DeepSpeed) and drop all but the last `keep_last`.
    `step_state` is the step function's own state (an RL step's running totals, PPO's KL
    coefficient) as JSON numbers."""
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
        state = {"step": step, "sampler": sampler.state_dict(), "world_size": backend.world_size,
                 "step_state": step_state or {}}
        (partial / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")  # last: marks it complete
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in checkpoint_steps(checkpoint_root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    backend.barrier()
    return final



def latest_checkpoint(checkpoint_root: Path) -> Path | None:
    complete = checkpoint_steps(checkpoint_root)
    return complete[-1][1] if complete else None


def load_checkpoint(backend: Backend, sampler: EpochSampler, source: Path) -> tuple[int, dict[str, Any]]:
    """Restore weights, optimizer, sampler position and this rank's RNG state from `source`;
    returns its step and the step function's state (empty from a checkpoint written before
    step states were saved). A directory that is not a checkpoint, or one of another model shape or
    world size, is refused before anything is loaded."""
    if not (source / STATE_FILE).is_file():
        raise ConfigError(f"resume_from: {source} is not a checkpoint (no {STATE_FILE})")
    check_checkpoint_shapes(source, backend.module)
    state = json.loads((source / STATE_FILE).read_text(encoding="utf-8"))
    if state["world_size"] != backend.world_size:
        raise ConfigError(f"{source}: written by {state['world_size']} ranks, this run has {backend.world_size}")
    backend.load_state(source)
    sampler.load_state_dict(state["sampler"])
    load_rng_state(source, backend.rank)
    return int(state["step"]), state.get("step_state", {})


def prune_checkpoints(checkpoint_root: Path, after_step: int) -> None:
    """Drop checkpoints past `after_step` (another history: resume off, or `resume_from` an
    earlier one) and partial saves a kill interrupted."""
    for step_number, stale in checkpoint_steps(checkpoint_root):
        if step_number > after_step:
            shutil.rmtree(stale, ignore_errors=True)
    for partial in checkpoint_root.glob("step-*.partial"):
        shutil.rmtree(partial, ignore_errors=True)
