"""Training loop, pretraining, held-out perplexity and the report, on real tiny artifacts."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest

from components.data.curate import curate
from components.data.pack import PackConfig, pack
from components.records import read_column
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from components.errors import ConfigError
from components.feasibility.training import TrainingEstimateConfig, TrainingTarget, estimate_training
from components.eval.perplexity import PerplexityConfig, evaluate_perplexity
from components.eval.report import LOSS_CSV, LOSS_PNG, REPORT_FILE, ReportConfig, report
from components.models.factory import ModelConfig
from components.train.optim import OptimConfig, lr_multiplier
from components.train.config import TrainConfig
from components.train.pretrain import PretrainConfig, pretrain
from components.runlog import PUBLISHED_STEP_LOG_FILE
from flows.params import heldout_curation
from tests.conftest import REPO_ROOT

TINY_MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                         max_position_embeddings=64)


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    config = OptimConfig(warmup_steps=10, min_lr_ratio=0.1, lr_schedule="cosine")
    assert lr_multiplier(0, 100, config) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, config) == pytest.approx(1.0)
    assert lr_multiplier(55, 100, config) == pytest.approx(0.55)  # cosine midpoint: floor + half the range
    assert lr_multiplier(100, 100, config) == pytest.approx(0.1)
    linear = config.model_copy(update={"lr_schedule": "linear"})
    assert lr_multiplier(32, 100, linear) == pytest.approx(0.1 + 0.9 * (1 - 22 / 90))
    assert lr_multiplier(50, 100, config.model_copy(update={"lr_schedule": "constant"})) == 1.0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chain")
    normalise_only = heldout_curation()
    curate(normalise_only.model_copy(update={"max_docs": 200}), str(REPO_ROOT / "data/raw/gsm8k/train.jsonl"),
           str(root / "train"))
    curate(normalise_only.model_copy(update={"max_docs": 10}), str(REPO_ROOT / "data/raw/gsm8k/test.jsonl"),
           str(root / "heldout"))
    train_tokenizer(TokenizerConfig(vocab_size=300), str(root / "train"), str(root / "tok"))
    pack(PackConfig(seq_len_tokens=32), str(root / "train"), str(root / "tok"), str(root / "blocks"))
    return root


def run_pretrain(config: PretrainConfig, prepared: Path, name: str):
    """Estimate this exact run on a CPU (the gate), then pretrain."""
    estimate = TrainingEstimateConfig(target=TrainingTarget(), model=config.model, seq_len_tokens=32,
                                      batch_size_blocks=config.train.batch_size_rows, max_steps=config.train.max_steps)
    estimate_training(estimate, str(prepared / "tok"), str(prepared / f"{name}_estimate"))
    return pretrain(config, str(prepared / "blocks"), str(prepared / "tok"), str(prepared / f"{name}_estimate"),
                    str(prepared / name))


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(model_dir / "model.safetensors")


def test_pretraining_learns_and_is_deterministic(prepared: Path) -> None:
    import torch

    config = PretrainConfig(model=TINY_MODEL, train=TrainConfig(  # fp32: the estimate's (TrainingTarget's default)
        batch_size_rows=8, max_steps=40, precision="fp32", optim=OptimConfig(learning_rate=1e-2, warmup_steps=5)))
    manifest = run_pretrain(config, prepared, "model_a")
    records = [json.loads(l) for l in (prepared / "model_a" / PUBLISHED_STEP_LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert records[0]["loss"] == pytest.approx(math.log(300), rel=0.05)  # untrained: about uniform
    assert manifest.metrics["final_loss"] < records[0]["loss"] - 1.0
    assert all(r["grad_norm"] > 0 and r["loss_tokens"] == 8 * 31 and r["tokens"] == 8 * 32 for r in records)
    assert all(0 < r["mfu"] < 1 and r["peak_memory_gib"] > 0 for r in records)

    run_pretrain(config, prepared, "model_b")
    a, b = _weights(prepared / "model_a"), _weights(prepared / "model_b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_pretrain_refuses_blocks_longer_than_the_context(prepared: Path) -> None:
    short = TINY_MODEL.model_copy(update={"max_position_embeddings": 16})
    with pytest.raises(ConfigError, match=r"max_position_embeddings \(16\) is shorter than the packed blocks \(32"):
        run_pretrain(PretrainConfig(model=short, train=TrainConfig(max_steps=1, optim=OptimConfig(warmup_steps=1))),
                     prepared, "never")
    assert not (prepared / "never").exists()


def test_perplexity_matches_an_independent_computation(prepared: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = prepared / "model_eval"  # fp32 below: the estimate's precision (TrainingTarget's default)
    run_pretrain(PretrainConfig(model=TINY_MODEL, train=TrainConfig(batch_size_rows=8, max_steps=5, precision="fp32",
                                                                    optim=OptimConfig(warmup_steps=5))),
                 prepared, "model_eval")
    manifest = evaluate_perplexity(PerplexityConfig(batch_size_docs=3), str(model_dir), str(prepared / "heldout"),
                                   str(prepared / "blocks"), str(prepared / "eval"))
    metrics = manifest.metrics

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    eos = tokenizer.eos_token_id
    counts = Counter(t for block in read_column(prepared / "blocks", "input_ids") for t in block)
    total = sum(counts.values())
    vocab = model.config.vocab_size
    model_nll = unigram_nll = 0.0
    tokens = 0
    truncated = 0
    for text in read_column(prepared / "heldout", "text"):  # one document at a time, no padding
        ids = torch.tensor([[eos, *tokenizer(text, add_special_tokens=False)["input_ids"], eos]])
        truncated += ids.shape[1] > TINY_MODEL.max_position_embeddings
        ids = ids[:, : TINY_MODEL.max_position_embeddings]  # the evaluator caps at the model's context
        n = ids.shape[1] - 1
        with torch.no_grad():
            model_nll += model(input_ids=ids, labels=ids).loss.item() * n
        unigram_nll -= sum(math.log((counts[t] + 1) / (total + vocab)) for t in ids[0, 1:].tolist())
        tokens += n
    assert metrics["tokens"] == tokens
    assert metrics["truncated_docs"] == truncated > 0
    assert metrics["perplexity"] == pytest.approx(math.exp(model_nll / tokens), rel=1e-4)
    assert metrics["unigram_perplexity"] == pytest.approx(math.exp(unigram_nll / tokens), rel=1e-6)
    assert metrics["uniform_perplexity"] == vocab == len(tokenizer)

    summary = report(ReportConfig(title="t"), str(prepared / "eval"), str(model_dir), str(prepared / "report"))
    assert summary.metrics["heldout_perplexity"] == metrics["perplexity"]
    assert (prepared / "report" / LOSS_PNG).read_bytes().startswith(b"\x89PNG")
    assert (prepared / "report" / LOSS_CSV).read_text().splitlines()[0] == "step,loss,loss_smoothed"
    assert "unigram baseline" in (prepared / "report" / REPORT_FILE).read_text()
