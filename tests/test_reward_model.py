"""The reward-model trainer on a real tiny model, its scoring helpers, and best-of-n by reward
model in the verifiable-accuracy evaluator."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.errors import ConfigError
from components.train.config import DistributedConfig, TrainConfig
from components.train.optim import OptimConfig
from components.models.reward import load_reward_model, score
from components.train.reward_model import RewardModelConfig, reward_model
from components.runlog import PUBLISHED_STEP_LOG_FILE
from tests.test_preferences import build_base, train_noisy_sft, write_five_problems, write_sign_pairs

PAIRS = 96
HELDOUT_FRACTION = 0.25


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reward model trained for 30 steps on the easy sign preference set (root/rm)."""
    root = tmp_path_factory.mktemp("reward_model")
    build_base(root)
    write_sign_pairs(root / "pairs.jsonl", PAIRS)
    train = TrainConfig(batch_size_rows=8, max_steps=30, checkpoint_every_steps=0,
                        optim=OptimConfig(learning_rate=5e-3, warmup_steps=5))
    config = RewardModelConfig(heldout_fraction=HELDOUT_FRACTION, train=train)
    reward_model(config, str(root / "pairs.jsonl"), str(root / "model"), str(root / "rm"))
    return root


def test_training_raises_heldout_pairwise_accuracy(trained: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from components.artifacts import read_manifest

    metrics = read_manifest(str(trained / "rm")).metrics
    assert metrics["heldout_pairs"] == 24 and metrics["train_pairs"] == 72 and metrics["pairs_read"] == PAIRS
    assert metrics["heldout_accuracy_before"] <= 0.75  # an untrained score head ranks about at chance
    assert metrics["heldout_accuracy_after"] >= 0.95
    assert metrics["heldout_accuracy_after"] >= metrics["heldout_accuracy_before"] + 0.25
    assert metrics["heldout_loss_after"] < metrics["heldout_loss_before"] - 0.3
    assert metrics["heldout_margin_after"] > 1.0
    records = [json.loads(line) for line in (trained / "rm" / PUBLISHED_STEP_LOG_FILE).read_text().splitlines()]
    assert len(records) == 30 and all(r["loss_tokens"] == 8 for r in records)  # one loss unit per pair
    assert records[0]["loss"] == pytest.approx(0.6931, abs=0.01)  # r_chosen ~ r_rejected at the start
    assert sum(r["loss"] for r in records[-5:]) / 5 < 0.3
    assert all(0 <= r["pairwise_accuracy"] <= 1 and "reward_margin" in r for r in records)
    assert sum(r["pairwise_accuracy"] for r in records[-5:]) / 5 > 0.9
    model = AutoModelForSequenceClassification.from_pretrained(trained / "rm")  # a plain transformers model
    tokenizer = AutoTokenizer.from_pretrained(trained / "rm")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id


def test_score_ranks_like_training_and_ignores_padding(trained: Path) -> None:
    import torch

    from components.artifacts import read_manifest
    from components.train.pairwise import split_heldout

    model, tokenizer = load_reward_model(trained / "rm")
    pairs = [json.loads(line) for line in (trained / "pairs.jsonl").read_text().splitlines()]
    index = torch.arange(PAIRS)[:, None]
    _, heldout = split_heldout({"chosen_input_ids": index, "rejected_input_ids": index}, HELDOUT_FRACTION, 0, "pairs")
    held = [pairs[i] for i in heldout["chosen_input_ids"].flatten().tolist()]
    chosen = score(model, tokenizer, [p["prompt"] for p in held], [p["chosen"] for p in held])
    rejected = score(model, tokenizer, [p["prompt"] for p in held], [p["rejected"] for p in held])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(held)
    assert accuracy == pytest.approx(read_manifest(str(trained / "rm")).metrics["heldout_accuracy_after"])
    one_at_a_time = [score(model, tokenizer, [p["prompt"]], [p["rejected"]])[0] for p in held[:4]]
    assert one_at_a_time == pytest.approx(rejected[:4], abs=1e-5)  # right padding never changes a score


def test_a_model_without_a_reward_head_is_refused(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model: not a reward model \(architectures \['LlamaForCausalLM'\], "
                                          r"2 labels\)"):
        load_reward_model(trained / "model")
    with pytest.raises(ConfigError, match="not a model directory"):
        load_reward_model(tmp_path)


def test_best_of_n_by_reward_model_is_reported_beside_the_other_strategies(trained: Path, tmp_path: Path) -> None:
    from components.eval.accuracy import AccuracyConfig, evaluate_accuracy

    policy = train_noisy_sft(tmp_path, trained / "model")  # answers 5 (right) or -5 (wrong)
    write_five_problems(tmp_path / "problems.jsonl", 8)
    config = AccuracyConfig(max_problems=8, samples_per_problem=4, ks=[1, 4], ns=[1, 4], temperature=1.0,
                            max_new_tokens=8, tool_use=False, reflection_rounds=0)
    manifest = evaluate_accuracy(config, str(policy), str(tmp_path / "problems.jsonl"), str(tmp_path / "eval"),
                                 reward_model=str(trained / "rm"))
    metrics = manifest.metrics
    assert "reward_model" in manifest.inputs
    rows = [json.loads(line) for line in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]
    picked = [max(row["samples"], key=lambda s: s["reward"])["correct"] for row in rows]
    assert metrics["best_reward@4"] == pytest.approx(sum(picked) / len(rows))  # the sample the reward model ranks first
    assert metrics["best_reward@1"] == metrics["oracle@1"] == pytest.approx(metrics["pass@1"])  # one sample: no choice
    assert 0 < metrics["sample_accuracy"] < 1 and metrics["best_reward@4"] > metrics["sample_accuracy"]
    curve = {(line.split(",")[0], line.split(",")[1]): line.split(",")
             for line in (tmp_path / "eval/accuracy_vs_compute.csv").read_text().splitlines()[1:]}
    assert len(curve) == 4 * 2  # oracle, majority, best_logprob, best_reward at n = 1, 4
    assert float(curve["best_reward", "4"][4]) > float(curve["best_logprob", "4"][4])  # scoring costs FLOPs too


def _short_run(distributed: DistributedConfig | None = None) -> RewardModelConfig:
    # fp32: two DeepSpeed ranks (bf16 weights there, not autocast) are compared with one process to 1e-5
    train = TrainConfig(batch_size_rows=8, micro_batch_rows=2, max_steps=3, checkpoint_every_steps=0, precision="fp32",
                        optim=OptimConfig(learning_rate=5e-3, warmup_steps=1))
    if distributed is not None:
        train = train.model_copy(update={"distributed": distributed})
    return RewardModelConfig(heldout_fraction=HELDOUT_FRACTION, train=train)


def test_the_new_score_head_is_seeded(trained: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        reward_model(_short_run(), str(trained / "pairs.jsonl"), str(trained / "model"), str(tmp_path / name))
    assert (tmp_path / "a/model.safetensors").read_bytes() == (tmp_path / "b/model.safetensors").read_bytes()


@pytest.mark.slow
def test_two_deepspeed_cpu_ranks_train_the_single_process_reward_model(trained: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    pairs, model = str(trained / "pairs.jsonl"), str(trained / "model")
    single = reward_model(_short_run(), pairs, model, str(tmp_path / "single")).metrics
    ranks = reward_model(_short_run(DistributedConfig(launcher="deepspeed", num_procs=2)), pairs, model,
                         str(tmp_path / "ranks")).metrics
    assert ranks["world_size"] == 2 and ranks["backend"] == "deepspeed"
    assert ranks["heldout_loss_after"] == pytest.approx(single["heldout_loss_after"], abs=1e-5)
    one, two = load_file(tmp_path / "single/model.safetensors"), load_file(tmp_path / "ranks/model.safetensors")
    assert max(float((one[name] - two[name]).abs().max()) for name in one) < 1e-5
