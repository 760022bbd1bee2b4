"""A trainer as a component, and where it runs: in this process, or on the ranks of a
`deepspeed` launch.

A trainer is its config and one function `fit(job) -> Trained`, registered by name in
`TRAINERS` as a `TrainerJob`; `produce_trained` turns it into a component. Its build
describes the run as a *job* (trainer name, config, input paths, output and run directories)
and calls `run_job`. Without a launcher the job runs here; with `launcher: deepspeed` this
process starts `deepspeed [--hostfile H] --num_gpus N --module components.train.worker
job.json`, every rank runs the same job (the training loop picks the DeepSpeed backend),
rank 0 writes the model and `result.json`, and this process reads the result back. A failed
launch raises with the tail of the ranks' output. The run's metrics are then published.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.artifacts import (
    ArtifactRef, ComponentSpec, Manifest, produce, run_directory,
)
from components.config import StrictConfig
from components.errors import CrucibleError
from components.locks import exclusive
from components.train.config import DistributedConfig, TrainConfig
from components.train.publish import publish_metrics

# trainer name (its component's spec name) -> "module:attribute" of its TrainerJob
TRAINERS = {
    "pretrain": "components.train.pretrain:train_job",
    "sft": "components.train.sft:train_job",
    "prompt_tuning": "components.train.prompt_tuning:train_job",
    "grpo": "components.train.grpo:train_job",
    "ppo": "components.train.ppo:train_job",
    "reward_model": "components.train.reward_model:train_job",
    "dpo": "components.train.dpo:train_job",
    "agent_grpo": "components.train.agent_grpo:train_job",
}
USER_CODE_KEY = "reward_code"  # the metric recording the user functions a config names, by source hash
RESULT_FILE = "result.json"
JOB_FILE = "job.json"
LAUNCH_LOG = "launch.log"


class LaunchError(CrucibleError):
    """The deepspeed launcher or one of its ranks failed."""


def _resolve_lazy_imports() -> None:
    """transformers resolves its top-level names lazily, and that resolution is not safe when
    two threads (two trainer tasks of one flow) do it at once; do it once, under the process lock."""
    with exclusive():
        import transformers

        for name in ("AutoModelForCausalLM", "AutoModelForSequenceClassification", "AutoTokenizer", "AutoConfig",
                     "LlamaConfig", "LlamaForCausalLM", "LlamaForSequenceClassification", "PreTrainedModel"):
            getattr(transformers, name)


def execute_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run a job in this process (or this rank); rank 0 writes its metrics to run_dir/result.json."""
    _resolve_lazy_imports()
    module_name, function_name = TRAINERS[job["trainer"]].split(":")
    metrics = getattr(importlib.import_module(module_name), function_name)(job)
    if int(os.environ.get("RANK", "0")) == 0:
        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULT_FILE).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    return metrics


def world_size_of(config: TrainConfig, estimate: dict[str, Any] | None) -> int:
    """Ranks the run will have: 1 in-process, else num_procs, else the estimate's num_gpus."""
    if config.distributed.launcher == "none":
        return 1
    return config.distributed.num_procs or (estimate or {}).get("num_gpus", 1)


def zero_stage_of(config: TrainConfig, estimate: dict[str, Any] | None) -> int:
    if config.distributed.launcher == "none":
        return 0
    ds = config.distributed.deepspeed_config or (estimate or {}).get("deepspeed_config") or {}
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def deepspeed_command(distributed: DistributedConfig, num_procs: int, job_path: Path) -> list[str]:
    """`deepspeed` on this node's ranks (master on 127.0.0.1), on a hostfile's nodes (over ssh), or
    on this node's share of a hostfile (`node_rank`: DeepSpeed's `--no_ssh`)."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).with_name("deepspeed"))
    if distributed.hostfile and distributed.node_rank is not None:  # one launcher per node, no ssh between them
        where = ["--hostfile", distributed.hostfile, "--no_ssh", "--node_rank", str(distributed.node_rank),
                 "--master_addr", distributed.master_addr or "127.0.0.1"]
    elif distributed.hostfile:  # this launcher reaches every node over passwordless ssh
        where = ["--hostfile", distributed.hostfile]
    else:
        where = ["--master_addr", "127.0.0.1"]
    return [launcher, *where, "--num_gpus", str(num_procs), "--master_port", str(distributed.master_port or _free_port()),
            "--module", "components.train.worker", str(job_path)]


@dataclass(frozen=True)
class Job:
    """A job as a trainer reads it: its validated config, input paths, run and output directories."""

    config: Any
    paths: dict[str, Path]
    run_dir: Path
    out_dir: Path


def make_job(trainer: str, config: StrictConfig, paths: dict[str, Path], out_dir: Path, dest: str) -> dict[str, Any]:
    """The job a component build hands to `run_job` (JSON, so a launcher can pass it to ranks)."""
    return {"trainer": trainer, "config": config.model_dump(mode="json"),
            "inputs": {name: str(path) for name, path in paths.items()}, "out_dir": str(out_dir),
            "run_dir": str(run_directory(dest))}


def read_job(job: dict[str, Any], config_type: type[StrictConfig]) -> Job:
    return Job(config=config_type.model_validate(job["config"]),
               paths={name: Path(path) for name, path in job["inputs"].items()},
               run_dir=Path(job["run_dir"]), out_dir=Path(job["out_dir"]))


@dataclass(frozen=True)
class Trained:
    """What `fit` returns on every rank: the rank, and its metrics, computed only on rank 0
    (they read the step log and the published model, which rank 0 writes)."""

    rank: int
    report: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class TrainerJob:
    """A trainer as `TRAINERS` runs it on every rank: the job's config read as `config_type`,
    `fit` run, and its metrics on rank 0 (`{}` on the others)."""

    config_type: type[StrictConfig]
    fit: Callable[[Job], Trained]

    def __call__(self, job: dict[str, Any]) -> dict[str, Any]:
        trained = self.fit(read_job(job, self.config_type))
        return trained.report() if trained.rank == 0 else {}


def run_job(job: dict[str, Any], distributed: DistributedConfig, num_procs: int) -> dict[str, Any]:
    """Run `job` here or under the deepspeed launcher with `num_procs` ranks per node."""
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RESULT_FILE).unlink(missing_ok=True)
    if distributed.launcher == "none":
        return execute_job(job)
    job_path = run_dir / JOB_FILE
    job_path.write_text(json.dumps(job, indent=2), encoding="utf-8")
    env = dict(os.environ)
    import torch

    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    repo_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [repo_root, env.get("PYTHONPATH")]))
    command = deepspeed_command(distributed, num_procs, job_path)
    log_path = run_dir / LAUNCH_LOG
    with open(log_path, "w", encoding="utf-8") as log:
        returncode = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=repo_root).returncode
    result_path = run_dir / RESULT_FILE
    if returncode != 0 or not result_path.is_file():
        tail = "".join(log_path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-25:])
        raise LaunchError(f"deepspeed launch of {job['trainer']} failed (exit {returncode}); see {log_path}:\n{tail}")
    return json.loads(result_path.read_text(encoding="utf-8"))


Publish = Callable[[Path, Path, str, dict[str, Any]], None]  # (run_dir, out_dir, title, metrics)


@dataclass(frozen=True)
class Prepared:
    """What a component's checks before its run hand `produce_trained`: metrics to record after
    the run's (a tokenizer fingerprint), and the ranks per node where not the config's alone."""

    metrics: dict[str, Any] = field(default_factory=dict)
    world_size: int | None = None


def produce_trained(spec: ComponentSpec, config: Any, inputs: Mapping[str, str | ArtifactRef], dest: str, title: str,
                    *, overwrite: bool = False, prepare: Callable[[Path, dict[str, Path]], Prepared] | None = None,
                    publish: Publish = publish_metrics) -> Manifest:
    """Publish a run of the trainer `spec.name` (in `TRAINERS`) as the component `spec`.
    `prepare(out_dir, paths)` checks the inputs first; the job runs here or under deepspeed;
    its metrics, then `prepare`'s, then the user code the config names (`code_fingerprints`,
    which the cache key holds) are published by `publish` under `title` and returned."""
    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        prepared = prepare(out_dir, paths) if prepare is not None else Prepared()
        fingerprints = config.code_fingerprints()
        job = make_job(spec.name, config, paths, out_dir, dest)
        ranks = prepared.world_size or world_size_of(config.train, None)
        metrics = {**run_job(job, config.train.distributed, ranks), **prepared.metrics}
        if fingerprints:
            metrics[USER_CODE_KEY] = fingerprints
        publish(Path(job["run_dir"]), out_dir, title, metrics)
        return metrics

    return produce(spec, config, inputs, dest, build, overwrite=overwrite)
