"""The verifiable-accuracy evaluator on a real tiny model: its numbers agree with its samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.errors import ConfigError, DataError
from components.eval.accuracy import AccuracyConfig, evaluate_accuracy
from components.models.precision import this_cpu_bf16_units
from tests.conftest import REPO_ROOT, build_tiny_lm, sft_on_records

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


def test_greedy_only_on_the_decode_sampler_matches_generate_and_gives_intervals(tiny_model: Path, tmp_path: Path
                                                                              ) -> None:
    from components.eval.intervals import wilson_interval

    common = dict(max_problems=6, samples_per_problem=0, ks=[], ns=[], max_new_tokens=16, tool_use=False,
                  reflection_rounds=0)
    by_generate = evaluate_accuracy(AccuracyConfig(**common), str(tiny_model), str(HELDOUT), str(tmp_path / "g"))
    by_decode = evaluate_accuracy(AccuracyConfig(**common, sampler="decode", batch_prompts=6), str(tiny_model),
                                  str(HELDOUT), str(tmp_path / "d"))
    texts = [[json.loads(line)["greedy"] for line in (tmp_path / name / "samples.jsonl").read_text().splitlines()]
             for name in ("g", "d")]
    assert texts[0] == texts[1] and all(texts[0])
    metrics = by_decode.metrics
    assert "pass@1" not in metrics and metrics["problems_used"] == 6
    correct = round(metrics["greedy_accuracy"] * 6)
    assert (metrics["greedy_accuracy_ci95_low"], metrics["greedy_accuracy_ci95_high"]) == wilson_interval(correct, 6)
    bf16 = evaluate_accuracy(AccuracyConfig(**common, sampler="decode", precision="bf16"), str(tiny_model),
                             str(HELDOUT), str(tmp_path / "b"))
    assert bf16.metrics["problems_used"] == 6
    assert (by_decode.metrics["precision"], bf16.metrics["precision"]) == ("fp32", "bf16")  # what decoded, recorded
    assert by_decode.metrics["precision_reason"] == "precision: fp32 in the config"
    auto = evaluate_accuracy(AccuracyConfig(**common, sampler="decode", precision="auto"), str(tiny_model),
                             str(HELDOUT), str(tmp_path / "a")).metrics
    assert auto["precision"] == ("bf16" if this_cpu_bf16_units() else "fp32")  # by this machine's /proc/cpuinfo
    assert auto["precision_reason"].startswith("auto: cpu has ")


def test_bad_evaluation_inputs_are_named(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"ks \[8\] must lie in \[1, samples_per_problem=4\]"):
        AccuracyConfig(samples_per_problem=4, ks=[8], ns=[1])
    with pytest.raises(ValidationError, match=r"ks \[1, 2, 4, 8\] must lie in \[1, samples_per_problem=0\]"):
        AccuracyConfig(samples_per_problem=0)  # greedy only takes no pass@k
    with pytest.raises(ValidationError, match="ns is empty"):
        AccuracyConfig(samples_per_problem=2, ks=[1], ns=[])
    with pytest.raises(ConfigError, match=r"test.jsonl: problem 1's prompt \(\d+ tokens\) \+ max_new_tokens \(600\) "
                                          r"exceed the context of .*model \(512 tokens\)"):
        evaluate_accuracy(AccuracyConfig(max_new_tokens=600), str(tiny_model), str(HELDOUT), str(tmp_path / "c"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "1+1?"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing column\(s\) \['answer'\]"):
        evaluate_accuracy(AccuracyConfig(), str(tiny_model), str(bad), str(tmp_path / "a"))
    no_answer = tmp_path / "no_answer.jsonl"
    no_answer.write_text('{"question": "1+1?", "answer": "two"}\n')
    with pytest.raises(DataError, match="no '####' final-answer marker"):
        evaluate_accuracy(AccuracyConfig(), str(tiny_model), str(no_answer), str(tmp_path / "b"))
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c"))


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

    from components.models.sampling import sample_with_calculator

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
    assert result.calculator_calls == (("2+3", "5"),)  # the call's expression and what was inserted


# --------------------------------------------------------------------------- what was used, and the transcripts

CALL = "<<2+3=5>>5\n"


def train_calculator_sft(root: Path, base_model: Path) -> Path:
    """A tiny model fine-tuned (real sft_data + sft) to answer every question with a calculator
    call and then `#### 5` 60% of the time, `#### -5` otherwise: its greedy answer uses the
    calculator and says 5, its samples are sometimes right and sometimes wrong."""
    import random

    rng = random.Random(2)
    records = [{"prompt": f"Question {rng.randint(0, 99)}: how many?",
                "completion": CALL + ("#### 5" if rng.random() < 0.6 else "#### -5")} for _ in range(64)]
    return sft_on_records(root, base_model, records)


@pytest.fixture(scope="module")
def calculator_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_calculator_sft(tmp_path_factory.mktemp("calculator_sft"), tiny_model)


def write_fifteen(path: Path) -> Path:
    """15 problems in GSM8K's format; the answer is 5 for two in three and 7 for the rest."""
    rows = [{"question": f"Question {i}: how many?", "answer": f"so\n#### {7 if i % 3 == 2 else 5}"} for i in range(15)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def recompute_from_samples(rows: list[dict], rounds: int) -> dict[str, float]:
    """tool_accuracy, tool_calls_per_problem and reflection_round_r from samples.jsonl alone,
    by the rules the evaluator's docs state, with the verifier (not the stored flags) judging."""
    from components.tasks.calculator import evaluate_arithmetic, format_number
    from components.tasks.verifiers import is_correct

    for row in rows:
        for call in row["calculator"]["calls"]:  # every inserted result is the calculator's, and in the text
            assert format_number(evaluate_arithmetic(call["expression"])) == call["result"]
            assert f"<<{call['expression']}={call['result']}>>" in row["calculator"]["text"]
    out = {"tool_accuracy": sum(is_correct(r["calculator"]["text"], r["reference"]) for r in rows) / len(rows),
           "tool_calls_per_problem": sum(len(r["calculator"]["calls"]) for r in rows) / len(rows)}
    for round_index in range(rounds + 1):
        solved = 0
        for row in rows:
            attempts = row["reflection"]["attempts"]
            if row["reflection"]["feedback"] == "verifier":  # solved by any attempt up to this round
                solved += any(is_correct(a["answer"], row["reference"]) for a in attempts if a["round"] <= round_index)
            else:  # self: the attempt of this round counts
                [attempt] = [a for a in attempts if a["round"] == round_index]
                solved += is_correct(attempt["answer"], row["reference"])
        out[f"reflection_round_{round_index}"] = solved / len(rows)
    return out


def test_samples_hold_the_calculator_and_reflection_transcripts_the_metrics_come_from(
        calculator_model: Path, tmp_path: Path) -> None:
    from components.tasks.verifiers import is_correct

    dataset = write_fifteen(tmp_path / "my15.jsonl")
    config = AccuracyConfig(max_problems=12, samples_per_problem=2, ks=[1], ns=[1], max_new_tokens=24,
                            reflection_rounds=2, temperature=1.0)
    metrics = evaluate_accuracy(config, str(calculator_model), str(dataset), str(tmp_path / "eval")).metrics
    rows = [json.loads(line) for line in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]

    assert len(rows) == 12 and metrics["problems_used"] == 12 and metrics["problems_available"] == 15
    report = (tmp_path / "eval/report.md").read_text().splitlines()[0]
    assert report == "# Verifiable accuracy: 12 of 15 problems from `my15.jsonl` (capped by max_problems=12)"

    recomputed = recompute_from_samples(rows, config.reflection_rounds)
    assert recomputed == {name: metrics[name] for name in recomputed}
    assert 0 < metrics["tool_accuracy"] < 1 and metrics["tool_calls_per_problem"] > 0  # the check is not vacuous
    first_round = [is_correct(r["reflection"]["attempts"][0]["answer"], r["reference"]) for r in rows]
    assert 0 < sum(first_round) < len(rows)
    for row in rows:  # each stored verdict is the verifier's; feedback follows each failed, non-final attempt
        attempts = row["reflection"]["attempts"]
        assert [a["round"] for a in attempts] == list(range(len(attempts)))
        assert row["calculator"]["correct"] == is_correct(row["calculator"]["text"], row["reference"])
        for a in attempts:
            assert a["correct"] == is_correct(a["answer"], row["reference"])
            assert (a["feedback"] is None) == (a["correct"] or a["round"] == config.reflection_rounds)
    wrong = rows[first_round.index(False)]  # a mutated transcript no longer agrees with the metrics
    wrong["reflection"]["attempts"][0]["answer"] = f"#### {wrong['reference'].split('####')[-1].strip()}"
    assert recompute_from_samples(rows, config.reflection_rounds)["reflection_round_0"] > metrics["reflection_round_0"]


def test_self_reflection_transcripts_hold_each_critique_and_recompute_the_rounds(
        calculator_model: Path, tmp_path: Path) -> None:
    dataset = write_fifteen(tmp_path / "my15.jsonl")
    config = AccuracyConfig(max_problems=6, samples_per_problem=1, ks=[1], ns=[1], max_new_tokens=16,
                            reflection_rounds=2, reflection_feedback="self", temperature=1.0)
    metrics = evaluate_accuracy(config, str(calculator_model), str(dataset), str(tmp_path / "eval")).metrics
    rows = [json.loads(line) for line in (tmp_path / "eval/samples.jsonl").read_text().splitlines()]
    recomputed = recompute_from_samples(rows, config.reflection_rounds)
    assert recomputed == {name: metrics[name] for name in recomputed}
    for row in rows:  # every problem runs every round; a critique follows every round but the last
        attempts = row["reflection"]["attempts"]
        assert [a["round"] for a in attempts] == [0, 1, 2]
        assert all(isinstance(a["critique"], str) and a["feedback"].startswith(a["critique"]) for a in attempts[:-1])
        assert "critique" not in attempts[-1] and attempts[-1]["feedback"] is None


def test_a_report_says_how_many_problems_were_used_of_how_many() -> None:
    from components.eval.accuracy import problems_used_text

    assert problems_used_text(12, 15, 12, "my15.jsonl") == "12 of 15 problems from `my15.jsonl` (capped by max_problems=12)"
    assert problems_used_text(15, 15, 32, "my15.jsonl") == "15 of 15 problems from `my15.jsonl`"
