"""Where a step's arithmetic runs: this process alone (`TorchBackend`) or one rank of a
`deepspeed` launch (`DeepSpeedBackend`, ZeRO 0-3), behind one interface (forward-backward of
a micro-batch, all-reduce, optimizer step, state save/load, gathered parameters, barrier);
and what the device is (precision, peak FLOP/s for MFU, peak memory).

A loss module's `forward(**micro_batch)` returns the **sum** of its per-token losses, or
`(sum, {name: sum})` with extra quantities to log; its trainable parameters are optimised.
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.errors import ConfigError, CrucibleError
from components.models.precision import precision_autocast, precision_for, precision_record
from components.train.checkpoints import MODEL_DIR, load_module_state
from components.train.optim import make_optimizer

if TYPE_CHECKING:
    import torch

    from components.train.config import TrainConfig


def resolve_precision(precision: str, device: torch.device) -> str:
    return precision_for(precision, device)[0]


def local_precision_metrics(config: TrainConfig) -> dict[str, str]:
    """{"precision", "precision_reason"} of a run in this process (`local_backend`'s choice)."""
    return precision_record(config.precision, local_device())


def local_device() -> torch.device:
    """This process's best device: the first CUDA device if there is one, else the CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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

    def __init__(self, module: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.module, self.device = module.to(device), device
        self.precision, self.precision_reason = precision_for(config.precision, device)
        self.optimizer = make_optimizer(module, config.optim, fused=True)
        self.grad_clip_norm = config.optim.grad_clip_norm
        self.micro_batch_rows = config.micro_batch_rows or config.batch_size_rows

    def forward_backward(self, batch: dict[str, torch.Tensor], scale: float, last: bool) -> LossAndStats:
        with precision_autocast(self.device.type, self.precision):
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
        import torch

        optimizer = make_optimizer(module, config.optim)
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config)
        self.module, self.device = self.engine.module, self.engine.device
        self.rank, self.world_size = self.engine.global_rank, self.engine.world_size
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))
        self.micro_batch_rows = ds_config["train_micro_batch_size_per_gpu"]
        self.precision = ("bf16" if ds_config.get("bf16", {}).get("enabled")
                          else "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")
        chosen, reason = precision_for(config.precision, torch.device(self.device))
        self.precision_reason = reason if chosen == self.precision else f"the DeepSpeed config enables {self.precision}"

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
    precision = resolve_precision(config.precision, local_device())
    if precision == "bf16" and not ds.get("fp16", {}).get("enabled"):
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
    ds.pop("optimizer", None)  # ours (AdamW with decoupled weight decay on matrices) is passed in
    ds.pop("scheduler", None)  # the loop sets the learning rate itself
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


Backend = TorchBackend | DeepSpeedBackend


def _gradient_checkpointing(module: torch.nn.Module, config: TrainConfig) -> None:
    if config.gradient_checkpointing and hasattr(module, "enable_gradient_checkpointing"):
        module.enable_gradient_checkpointing()


def local_backend(module: torch.nn.Module, config: TrainConfig) -> TorchBackend:
    """This process on its best device (`local_device`)."""
    return TorchBackend(module, config, local_device())


def backend_for(module: torch.nn.Module, config: TrainConfig, run_dir: Path,
                estimate_ds_config: dict[str, Any] | None) -> Backend:
    """DeepSpeed on every rank of a distributed run (its resolved config written to
    `run_dir/deepspeed_config.json`), else this process; gradient checkpointing if asked."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and config.distributed.launcher != "deepspeed":
        micro_rows = config.micro_batch_rows or config.batch_size_rows
        if config.batch_size_rows % micro_rows:
            raise ConfigError(f"batch_size_rows ({config.batch_size_rows}) is not a multiple of micro_batch_rows "
                              f"({micro_rows})")
        _gradient_checkpointing(module, config)
        return local_backend(module, config)
    import deepspeed

    deepspeed.init_distributed(dist_backend=None)
    ds_config = deepspeed_config_for(config, estimate_ds_config, int(os.environ.get("WORLD_SIZE", "1")))
    _gradient_checkpointing(module, config)
    backend = DeepSpeedBackend(module, config, ds_config)
    if backend.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "deepspeed_config.json").write_text(json.dumps(ds_config, indent=2), encoding="utf-8")
    return backend
