"""The verifiable-accuracy evaluator on a real tiny model: its numbers agree with its samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.errors import DataError
from components.eval.accuracy import AccuracyConfig, evaluate_accuracy
from tests.conftest import REPO_ROOT, build_tiny_lm

HELDOUT = REPO_ROOT / "data/raw/gsm8k/test.jsonl"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("acc"))


def test_metrics_agree_with_the_recorded_samples(tiny_model: Path, tmp_path: Path) -> None:
    config = AccuracyConfig(max_problems=3, samples_per_problem=4, ks=[1, 4], ns=[1, 2, 4], max_new_tokens=24,
                            reflection_rounds=1)
    metrics = evaluate_accuracy(config, str(tiny_model), str(HELDOUT), str(tmp_path / "eval")).metrics
    rows = [json.loads(line) for line in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["samples"]) == 4 for r in rows)
    correct = sum(s["correct"] for r in rows for s in r["samples"])
    assert metrics["pass@1"] == pytest.approx(correct / 12) and metrics["failed_problems"] == 0
    assert metrics["oracle@4"] == pytest.approx(sum(any(s["correct"] for s in r["samples"]) for r in rows) / 3)
    assert {"majority@2", "best_logprob@4", "tool_accuracy", "reflection_round_1"} <= metrics.keys()
    curve = (tmp_path / "eval/accuracy_vs_compute.csv").read_text().splitlines()
    assert curve[0] == "method,n,accuracy,generated_tokens,inference_flops" and len(curve) == 1 + 9 + 1 + 2
    flops = {line.split(",")[0] + line.split(",")[1]: float(line.split(",")[4]) for line in curve[1:]}
    assert flops["oracle4"] > flops["oracle2"] > flops["oracle1"] > 0  # compute grows with n


def test_bad_evaluation_inputs_are_named(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"ks \[8\] must lie in \[1, samples_per_problem=4\]"):
        AccuracyConfig(samples_per_problem=4, ks=[8], ns=[1])
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AccuracyConfig(samples_per_problem=0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing column\(s\) \['answer'\]"):
        evaluate_accuracy(AccuracyConfig(), str(tiny_model), str(bad), str(tmp_path / "a"))
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "1+1?", "answer": "two"}\n')
    with pytest.raises(DataError, match="no '####' final-answer marker"):
        evaluate_accuracy(AccuracyConfig(), str(tiny_model), str(no_answer), str(tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


class ScriptedLM:
    """A stand-in language model (not a crucible component) that emits a fixed token script,
    one token per forward call, and records what it was fed."""

    def __init__(self, script: list[int], vocab: int) -> None:
        self.script, self.vocab, self.fed, self.calls = script, vocab, [], 0

    def eval(self) -> "ScriptedLM":
        return self

    def __call__(self, input_ids, cache=None, use_cache=True):
        import torch
        from types import SimpleNamespace

        self.fed.append(input_ids[0].tolist())
        logits = torch.zeros(1, input_ids.shape[1], self.vocab)
        logits[0, -1, self.script[min(self.calls, len(self.script) - 1)]] = 100.0
        self.calls += 1
        return SimpleNamespace(logits=logits, cache=cache)


def test_the_calculator_fills_in_results_and_the_model_reads_them(tiny_model: Path) -> None:
    from transformers import AutoTokenizer

    from components.eval.generate import sample_with_calculator

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    script = encode("2+3 = <<2+3=") + encode("5\n#### 5") + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    model = ScriptedLM(script, len(tokenizer))
    result = sample_with_calculator(model, tokenizer, "What is 2+3?", max_new_tokens=50, temperature=0.0)
    assert result.tool_calls == 1 and result.finished
    assert result.text.startswith("2+3 = <<2+3=5>>5")
    inserted = encode("5>>")
    assert any(feed[1:] == inserted for feed in model.fed)  # the calculator's tokens went through the model
    assert result.generated_tokens == len(script)  # inserted tokens are not counted as generated
