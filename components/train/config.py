"""What a training run is asked to do: steps, batch geometry, precision, checkpoint cadence,
resume, seed and how it is launched. Every trainer's config holds one `TrainConfig`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.train.optim import OptimConfig


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
        "auto", description="auto: bf16 autocast (fp32 master weights) where the device has bf16 arithmetic (CUDA "
                            "bf16; a CPU with AMX or AVX512-BF16), fp32 otherwise; the run's metrics say which and why.",
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
