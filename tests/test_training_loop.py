"""The shared training loop: exact resume after a real kill, accumulation, NaN stop,
checkpoint rotation and shape checks, and DeepSpeed ranks on CPU (the `deepspeed` launcher)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from components.data.curate import curate
from components.data.pack import PackConfig, pack
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from components.errors import ConfigError
from components.feasibility.estimate import NotFeasibleError
from components.feasibility.training import TrainingEstimateConfig, TrainingTarget, estimate_training
from components.models.factory import ModelConfig
from components.train.batches import TrainData
from components.train.checkpoints import checkpoint_steps
from components.train.config import DistributedConfig, TrainConfig
from components.train.engine import train
from components.train.optim import OptimConfig
from components.train.pretrain import PretrainConfig, pretrain
from components.train.run import TrainingDivergedError
from components.runlog import PUBLISHED_STEP_LOG_FILE
from flows.params import heldout_curation
from tests.conftest import REPO_ROOT

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   max_position_embeddings=64)
SEQ = 32


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loop")
    curate(heldout_curation().model_copy(update={"max_docs": 200}), str(REPO_ROOT / "data/raw/gsm8k/train.jsonl"),
           str(root / "train"))
    train_tokenizer(TokenizerConfig(vocab_size=300), str(root / "train"), str(root / "tok"))
    pack(PackConfig(seq_len_tokens=SEQ), str(root / "train"), str(root / "tok"), str(root / "blocks"))
    return root


def estimate_for(chain: Path, config: PretrainConfig, name: str, **target) -> str:
    planned = TrainingEstimateConfig(target=TrainingTarget(**target), model=config.model, seq_len_tokens=SEQ,
                                     batch_size_blocks=config.train.batch_size_rows, max_steps=config.train.max_steps)
    estimate_training(planned, str(chain / "tok"), str(chain / name), overwrite=True)
    return str(chain / name)


def run(chain: Path, config: PretrainConfig, name: str, **target):
    estimate = estimate_for(chain, config, f"{name}_estimate", **target)
    return pretrain(config, str(chain / "blocks"), str(chain / "tok"), estimate, str(chain / name))


def weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    import torch

    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], rtol=0, atol=atol), (key, (wa[key] - wb[key]).abs().max())


def runs_of(dest: Path) -> list[Path]:
    return sorted((dest.parent / f"{dest.name}.runs").iterdir())


def short_run(**fields: object) -> TrainConfig:
    """A test run of a few steps whose warmup spans the run (a longer warmup is refused)."""
    return TrainConfig(**fields, optim=OptimConfig(warmup_steps=fields["max_steps"]))


# fp32 where weights are compared across batch schedules or backends to 1e-6 (bf16 rounds
# differently per summation order, and DeepSpeed's bf16 is bf16 weights, not autocast), and
# where the run is pretrain's: the gate wants the estimate's precision (fp32 by default).
FP32 = "fp32"


RESUME_CONFIG = PretrainConfig(model=TINY, train=TrainConfig(
    batch_size_rows=32, max_steps=150, checkpoint_every_steps=20, keep_last_checkpoints=2, precision=FP32,
    optim=OptimConfig(learning_rate=5e-3, warmup_steps=10)))

CHILD = textwrap.dedent("""
    import sys
    from components.train.pretrain import PretrainConfig, pretrain
    config = PretrainConfig.model_validate_json(sys.argv[1])
    pretrain(config, *sys.argv[2:6])
""")


def spawn_pretrain(chain: Path, estimate: str, dest: Path) -> subprocess.Popen:
    """The pretrain component in a fresh process (every run of this test uses one, so all see
    the same thread count and library state)."""
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, RESUME_CONFIG.model_dump_json(), str(chain / "blocks"), str(chain / "tok"),
         estimate, str(dest)], cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )


def finish(child: subprocess.Popen) -> None:
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 0, stderr.decode()[-2000:]


def test_a_killed_run_resumes_to_the_same_weights_as_an_uninterrupted_one(chain: Path) -> None:
    from components.artifacts import read_manifest

    estimate = estimate_for(chain, RESUME_CONFIG, "resume_estimate")
    dest = chain / "resumed"
    child = spawn_pretrain(chain, estimate, dest)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and child.poll() is None:
        runs = runs_of(dest) if (chain / "resumed.runs").is_dir() else []
        if runs and any(step >= 40 for step, _ in checkpoint_steps(runs[0] / "checkpoints")):
            break
        time.sleep(0.01)
    assert child.poll() is None, "the run finished before it could be killed; make it longer"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not dest.exists()  # nothing published
    (run_dir,) = runs_of(dest)
    killed_at = checkpoint_steps(run_dir / "checkpoints")[-1][0]
    assert 40 <= killed_at < 150

    finish(spawn_pretrain(chain, estimate, dest))  # the same stage again: resumes
    assert read_manifest(str(dest)).metrics["resumed_from_step"] == killed_at
    records = [json.loads(line) for line in (dest / PUBLISHED_STEP_LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 151))  # each step once, across the kill

    finish(spawn_pretrain(chain, estimate, chain / "uninterrupted"))
    assert read_manifest(str(chain / "uninterrupted")).metrics["resumed_from_step"] is None
    assert_same_weights(dest, chain / "uninterrupted")
    assert [step for step, _ in checkpoint_steps(run_dir / "checkpoints")] == [120, 140]  # the last 2 kept


def test_gradient_accumulation_gives_the_big_batch_gradient(chain: Path) -> None:
    whole = PretrainConfig(model=TINY, train=short_run(batch_size_rows=8, max_steps=6, precision=FP32))
    accumulated = whole.model_copy(update={"train": whole.train.model_copy(update={"micro_batch_rows": 2})})
    run(chain, whole, "whole")
    run(chain, accumulated, "accumulated")
    assert_same_weights(chain / "whole", chain / "accumulated", atol=1e-6)


def test_gradient_checkpointing_recomputes_the_same_gradients(chain: Path) -> None:
    plain = PretrainConfig(model=TINY, train=short_run(batch_size_rows=8, max_steps=4, precision=FP32))
    recompute = plain.model_copy(update={"train": plain.train.model_copy(update={"gradient_checkpointing": True})})
    run(chain, plain, "plain")
    run(chain, recompute, "recompute", activation_checkpointing="full")  # the estimate must describe the run
    assert_same_weights(chain / "plain", chain / "recompute", atol=1e-6)


class ExplodesAt:
    """A loss module whose loss turns NaN on its n-th call (a diverging run)."""

    def __new__(cls, model, nan_on_call: int):
        from components.train.modules import CausalLMLoss

        class Exploding(CausalLMLoss):
            calls = 0

            def forward(self, **batch):
                Exploding.calls += 1
                loss = super().forward(**batch)
                return loss * float("nan") if Exploding.calls >= nan_on_call else loss

        return Exploding(model)


def tiny_model(chain: Path, model_config: ModelConfig = TINY):
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import build_causal_lm

    torch.manual_seed(0)
    return build_causal_lm(model_config, AutoTokenizer.from_pretrained(chain / "tok"))


def block_data(chain: Path) -> TrainData:
    import torch

    from components.records import read_column

    blocks = torch.tensor(read_column(chain / "blocks", "input_ids"))
    return TrainData({"input_ids": blocks, "labels": blocks})


def save_hf(module, directory: Path) -> None:
    module.model.save_pretrained(directory)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(chain: Path, tmp_path: Path) -> None:
    config = TrainConfig(batch_size_rows=4, max_steps=20, checkpoint_every_steps=5)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 7; stopped \(last good checkpoint: .*step-00000005"):
        train(ExplodesAt(tiny_model(chain), nan_on_call=7), block_data(chain), config, tmp_path,
              save_model=save_hf, flops_per_token=1.0, final_dir=tmp_path / "final")
    assert [step for step, _ in checkpoint_steps(tmp_path / "checkpoints")] == [5]
    assert (tmp_path / "checkpoints" / "step-00000005" / "model" / "model.safetensors").is_file()
    assert not (tmp_path / "final").exists()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))


def test_a_checkpoint_of_another_model_shape_is_refused(chain: Path, tmp_path: Path) -> None:
    from components.train.modules import CausalLMLoss

    train(CausalLMLoss(tiny_model(chain)), block_data(chain), short_run(batch_size_rows=4, max_steps=4,
          checkpoint_every_steps=2), tmp_path / "a", save_model=save_hf, flops_per_token=1.0)
    checkpoint = tmp_path / "a" / "checkpoints" / "step-00000002"
    wider = TINY.model_copy(update={"hidden_size": 48, "num_heads": 2})
    with pytest.raises(ConfigError, match=r"step-00000002: the checkpoint is of a different model shape: .*\[300, 32\] vs model \[300, 48\]"):
        train(CausalLMLoss(tiny_model(chain, wider)), block_data(chain), short_run(
            batch_size_rows=4, max_steps=4, resume_from=str(checkpoint)), tmp_path / "b", save_model=save_hf,
            flops_per_token=1.0)


def test_bad_training_data_is_named(chain: Path) -> None:
    import torch

    from components.errors import DataError

    with pytest.raises(DataError, match=r"blocks.parquet: the dataset is empty"):
        TrainData({"input_ids": torch.zeros(0, 4, dtype=torch.long), "labels": torch.zeros(0, 4, dtype=torch.long)},
                  source="blocks.parquet")
    with pytest.raises(DataError, match=r"x: training data needs input_ids and labels, has \['input_ids'\]"):
        TrainData({"input_ids": torch.zeros(2, 4, dtype=torch.long)}, source="x")
    with pytest.raises(DataError, match=r"no row has a token to train on"):
        TrainData({"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": torch.full((2, 4), -100)})


def test_the_estimate_must_describe_the_run(chain: Path) -> None:
    config = PretrainConfig(model=TINY, train=short_run(batch_size_rows=8, max_steps=2))
    with pytest.raises(NotFeasibleError, match=r"estimate.num_gpus=2 \(trainer runs 1\)"):
        run(chain, config, "two_gpu_estimate_one_process", num_gpus=2)
    assert not (chain / "two_gpu_estimate_one_process").exists()


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [1, 2, 3])
def test_deepspeed_ranks_on_cpu_train_the_single_process_model(chain: Path, zero_stage: int) -> None:
    """`deepspeed --num_gpus 2` with two CPU ranks, the ZeRO stage and DeepSpeed config taken from
    the estimate: both ranks end with identical weights, equal to one process on the same batches."""
    base = short_run(batch_size_rows=8, micro_batch_rows=2, max_steps=6, precision=FP32)
    single = PretrainConfig(model=TINY, train=base)
    ranks = PretrainConfig(model=TINY, train=base.model_copy(update={
        "distributed": DistributedConfig(launcher="deepspeed", num_procs=2)}))
    run(chain, single, f"single_{zero_stage}")
    manifest = run(chain, ranks, f"ranks_{zero_stage}", num_gpus=2, zero_stage=zero_stage)
    assert manifest.metrics["world_size"] == 2 and manifest.metrics["backend"] == "deepspeed"
    (run_dir,) = runs_of(chain / f"ranks_{zero_stage}")
    used = json.loads((run_dir / "deepspeed_config.json").read_text())
    assert used["zero_optimization"]["stage"] == zero_stage  # from the estimate's recommended plan
    assert used["gradient_accumulation_steps"] == 2 and used["train_batch_size"] == 8
    digests = {(run_dir / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)}
    assert len(digests) == 1
    assert_same_weights(chain / f"single_{zero_stage}", chain / f"ranks_{zero_stage}", atol=1e-6)


@pytest.mark.slow
def test_a_hostfile_from_the_prefect_task_launches_this_nodes_ranks_without_ssh(chain: Path, tmp_path: Path) -> None:
    """The hostfile the `deepspeed-hostfile` task writes, launched as node 0 (`--no_ssh`, as one
    pod or Slurm task per node would): two CPU ranks train the single-process model."""
    from flows.scale_out import deepspeed_hostfile

    hostfile = deepspeed_hostfile.fn(str(tmp_path / "hostfile"), 2, ["localhost"])
    base = short_run(batch_size_rows=8, micro_batch_rows=2, max_steps=4, precision=FP32)
    single = PretrainConfig(model=TINY, train=base)
    ranks = PretrainConfig(model=TINY, train=base.model_copy(update={"distributed": DistributedConfig(
        launcher="deepspeed", num_procs=2, hostfile=hostfile, node_rank=0)}))
    run(chain, single, "single_hostfile")
    manifest = run(chain, ranks, "ranks_hostfile", num_gpus=2, zero_stage=1)
    assert manifest.metrics["world_size"] == 2
    (run_dir,) = runs_of(chain / "ranks_hostfile")
    from components.train.launch import deepspeed_command

    command = deepspeed_command(ranks.train.distributed, 2, run_dir / "job.json")
    assert command[command.index("--hostfile") + 1] == hostfile and "--no_ssh" in command
    assert command[command.index("--node_rank") + 1] == "0"
    assert len({(run_dir / f"weights-rank{rank}.sha256").read_text() for rank in (0, 1)}) == 1
    assert_same_weights(chain / "single_hostfile", chain / "ranks_hostfile", atol=1e-6)


def test_a_nan_gradient_with_a_finite_loss_stops_before_the_update(chain: Path, tmp_path: Path) -> None:
    from components.train.modules import CausalLMLoss

    class NaNGradient(CausalLMLoss):
        def forward(self, **batch):
            weight = self.model.get_output_embeddings().weight
            return super().forward(**batch) + (weight - weight.detach()).abs().sqrt().sum()  # value 0, gradient inf

    model = tiny_model(chain)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(TrainingDivergedError, match=r"gradient norm became (nan|inf) at step 1"):
        train(NaNGradient(model), block_data(chain), short_run(batch_size_rows=4, max_steps=3), tmp_path,
              save_model=save_hf, flops_per_token=1.0)
    import torch

    assert all(torch.equal(before[name], p) for name, p in model.named_parameters())  # no update happened


def test_a_finished_run_is_not_resumed_by_a_rebuild(chain: Path, tmp_path: Path) -> None:
    from components.train.modules import CausalLMLoss

    config = short_run(batch_size_rows=4, max_steps=6, checkpoint_every_steps=2)
    first = train(CausalLMLoss(tiny_model(chain)), block_data(chain), config, tmp_path, save_model=save_hf,
                  flops_per_token=1.0)
    assert first.resumed_from_step is None and (tmp_path / "COMPLETED").is_file()
    again = train(CausalLMLoss(tiny_model(chain)), block_data(chain), config, tmp_path, save_model=save_hf,
                  flops_per_token=1.0)
    assert again.resumed_from_step is None and len(again.records) == 6  # retrained from step 1


def test_a_warmup_longer_than_the_run_is_refused_where_it_is_configured(tmp_path: Path) -> None:
    """warmup_steps > max_steps would stop the ramp below the peak learning rate: refused, naming
    both fields and values; warmup_steps <= max_steps reaches the peak, so it is accepted."""
    from pydantic import ValidationError

    from components.train.grpo import GRPOConfig
    from components.train.optim import lr_multiplier
    from flows.params import load_params
    from tests.conftest import REPO_ROOT, write_params

    for max_steps in (1, 3, 30):
        for warmup in (0, max_steps // 2, max_steps):
            config = TrainConfig(max_steps=max_steps, optim=OptimConfig(warmup_steps=warmup))
            assert max(lr_multiplier(step, max_steps, config.optim) for step in range(max_steps)) == 1.0
        too_long = OptimConfig(warmup_steps=max_steps + 1)
        assert max(lr_multiplier(step, max_steps, too_long) for step in range(max_steps)) < 1.0  # why it is refused
        with pytest.raises(ValidationError, match=rf"optim.warmup_steps \({max_steps + 1}\) exceeds max_steps "
                                                  rf"\({max_steps}\): the learning rate would peak at "
                                                  rf"{max_steps}/{max_steps + 1} of optim.learning_rate \(0.002\)"):
            TrainConfig(max_steps=max_steps, optim=too_long)
    with pytest.raises(ValidationError, match=r"optim.warmup_steps \(20, the default\) exceeds max_steps \(3\)"):
        TrainConfig(max_steps=3)
    with pytest.raises(ValidationError, match=r"train\n.*optim.warmup_steps \(10\) exceeds max_steps \(4\)"):
        GRPOConfig.model_validate({"train": {"max_steps": 4, "optim": {"warmup_steps": 10}}})  # the RL trainers too

    bad = write_params(tmp_path / "params.yaml", str(tmp_path / "artifacts"),
                       sft={"train": {"max_steps": 5, "optim": {"warmup_steps": 8}}})
    with pytest.raises(ConfigError, match=r"params.yaml: sft.train: Value error, optim.warmup_steps \(8\) exceeds "
                                          r"max_steps \(5\)"):
        load_params(bad)
    load_params(REPO_ROOT / "params.yaml")  # the shipped parameters and the tests' own pass
    load_params(write_params(tmp_path / "tiny.yaml", str(tmp_path / "artifacts")))
