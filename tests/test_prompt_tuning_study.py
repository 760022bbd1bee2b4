"""The prompt-tuning study reports the examples it used (not its caps) and names a better
initialisation only when the seeds support it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.train.config import TrainConfig
from components.train.optim import OptimConfig
from components.train.prompt_tuning import (
    MIN_SEEDS, SPREAD_FACTOR, PromptTuningConfig, PromptTuningStudyConfig, compare_inits, prompt_tuning_study,
)
from tests.conftest import REPO_ROOT, build_tiny_lm

GSM8K_TRAIN = REPO_ROOT / "data/raw/gsm8k/train.jsonl"
GSM8K_TEST = REPO_ROOT / "data/raw/gsm8k/test.jsonl"


def stats(*losses: float) -> dict:
    import statistics

    return {"mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else None,
            "runs": list(losses)}


def test_a_winner_needs_enough_seeds_and_a_gap_beyond_their_spread() -> None:
    one_seed = {"text": stats(3.0), "random": stats(3.5)}
    winner, sentence = compare_inits("text", "random", one_seed)
    assert winner is None and sentence.startswith("no verdict: 1 seed per initialisation has no seed spread")
    assert f"run at least {MIN_SEEDS} seeds each" in sentence

    spread = 0.01  # each init's runs: mean +- spread, so each std is spread * sqrt(2), combined 2 * spread
    noise = 2 * spread
    for gap, expected in ((0.5 * SPREAD_FACTOR * noise, None), (0.99 * SPREAD_FACTOR * noise, None),
                          (1.01 * SPREAD_FACTOR * noise, "text"), (10 * noise, "text")):
        by_init = {"text": stats(3.0 - spread, 3.0 + spread), "random": stats(3.0 + gap - spread, 3.0 + gap + spread)}
        winner, sentence = compare_inits("text", "random", by_init)
        assert winner == expected, (gap, sentence)
        assert sentence.startswith("no verdict: text is lower than random") if expected is None else \
            sentence.startswith("text initialisation is better than random")
        swapped = compare_inits("random", "text", by_init)  # the order of the arguments does not matter
        assert swapped[0] == winner


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("prompt_tuning"), max_positions=512)


def _study(seeds: list[int], max_heldout_examples: int) -> PromptTuningStudyConfig:
    train = TrainConfig(batch_size_rows=4, max_steps=2, checkpoint_every_steps=0,
                        optim=OptimConfig(learning_rate=0.03, weight_decay=0.0, warmup_steps=1))
    base = PromptTuningConfig(num_virtual_tokens=2, seq_len_tokens=256, max_train_examples=8,
                              max_heldout_examples=max_heldout_examples, train=train)
    return PromptTuningStudyConfig(base=base, inits=["text", "random"], seeds=seeds)


def test_the_study_reports_the_examples_it_used_and_no_verdict_from_one_seed(model: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from components.data.sft_data import pad_examples, tokenized_examples

    heldout = tmp_path / "my_heldout.jsonl"
    heldout.write_text("".join(GSM8K_TEST.read_text().splitlines(keepends=True)[:3]), encoding="utf-8")
    manifest = prompt_tuning_study(_study([0], 128), str(model), str(GSM8K_TRAIN), str(heldout), str(tmp_path / "study"))
    report = (tmp_path / "study/report.md").read_text()
    metrics = json.loads((tmp_path / "study/metrics.json").read_text())

    trained = len(pad_examples(tokenized_examples(GSM8K_TRAIN, "gsm8k", AutoTokenizer.from_pretrained(model),
                                                  max_examples=8), 256, 0, True, "train")["input_ids"])
    assert "on 3 of 3 held-out examples; without any prompt" in report and "128 held-out" not in report
    assert f"trained on {trained} of {sum(1 for _ in GSM8K_TRAIN.open())} train examples " \
           "(capped by max_train_examples=8)" in report
    assert metrics["heldout_examples"] == 3 and metrics["train_examples"] == trained
    assert metrics["best_init"] is None and metrics["verdict"].startswith("no verdict: 1 seed per initialisation")
    assert metrics["heldout_loss_text_std"] is None  # one run has no spread, not a spread of 0
    assert "| text | 1 | " in report and "± n/a |" in report and "Best initialisation: no verdict" in report
    assert manifest.metrics["best_init"] is None

    capped = prompt_tuning_study(_study([0], 2), str(model), str(GSM8K_TRAIN), str(heldout), str(tmp_path / "capped"))
    assert capped.metrics["heldout_examples"] == 2
    assert "on 2 of 3 held-out examples (capped by max_heldout_examples=2);" in (tmp_path / "capped/report.md").read_text()
