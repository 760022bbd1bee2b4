"""Held-out answer loss: the number transformers' own loss gives on the same labelled rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from components.data.sft_data import SFTDataConfig, sft_data
from components.errors import DataError
from components.eval.answer_loss import AnswerLossConfig, answer_loss
from components.records import read_column
from tests.conftest import sft_on_records

RECORDS = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a} + {b} = {a + b}\n#### {a + b}"}
           for a in range(2, 8) for b in range(3, 6)]


@pytest.fixture(scope="module")
def examples(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("answer-loss")
    (root / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:10]), encoding="utf-8")
    sft_data(SFTDataConfig(format="prompt_completion", seq_len_tokens=128, packing=False), str(root / "heldout.jsonl"),
             str(tiny_llama_dir), str(root / "rows"))
    return root / "rows"


def test_loss_equals_transformers_loss_and_sft_lowers_it(tiny_llama_dir: Path, examples: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    before = answer_loss(AnswerLossConfig(batch_rows=3), str(tiny_llama_dir), str(examples), str(tmp_path / "a")).metrics
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor(read_column(examples, "input_ids"))
    labels = torch.tensor(read_column(examples, "labels"))
    with torch.no_grad():
        oracle = float(model(input_ids=ids, labels=labels).loss)  # mean over every labelled token of every row
    assert before["answer_nll_per_token"] == pytest.approx(oracle, rel=1e-5)
    assert before["answer_perplexity"] == pytest.approx(math.exp(oracle), rel=1e-5)
    assert before["examples"] == 10
    assert before["example_mean_nll_ci95_low"] <= before["example_mean_nll"] <= before["example_mean_nll_ci95_high"]

    tuned = sft_on_records(tmp_path, tiny_llama_dir, RECORDS[10:])
    after = answer_loss(AnswerLossConfig(batch_rows=3), str(tuned), str(examples), str(tmp_path / "b")).metrics
    assert after["answer_nll_per_token"] < 0.8 * before["answer_nll_per_token"]  # 5.99 -> 3.90 nats when written


def test_packed_rows_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS[:4]), encoding="utf-8")
    sft_data(SFTDataConfig(format="prompt_completion", seq_len_tokens=128), str(tmp_path / "d.jsonl"),
             str(tiny_llama_dir), str(tmp_path / "packed"))
    with pytest.raises(DataError, match="packed rows; build them with sft_data `packing: false`"):
        answer_loss(AnswerLossConfig(), str(tiny_llama_dir), str(tmp_path / "packed"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_each_row_scores_as_it_does_alone(tiny_llama_dir: Path, examples: Path) -> None:
    """Rows are batched shortest first and cut after their last label: each row's NLL must still
    be its own, the value transformers gives that row scored alone (a row given another's score,
    or cut before a label, fails)."""
    import torch
    from transformers import AutoModelForCausalLM

    from components.eval.answer_loss import example_nll

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.tensor(read_column(examples, "input_ids"))
    labels = torch.tensor(read_column(examples, "labels"))
    labels[::2, -1] = ids[::2, -1]  # every other row also scores its last (padding) column: widths differ
    sums, counts = example_nll(model, ids, labels, batch_rows=3)
    with torch.no_grad():
        alone = [float(model(input_ids=ids[i:i + 1], labels=labels[i:i + 1]).loss) for i in range(len(ids))]
    assert counts == (labels[:, 1:] != -100).sum(-1).tolist()
    assert [s / c for s, c in zip(sums, counts)] == pytest.approx(alone, rel=1e-5)
    assert len(set(round(a, 4) for a in alone)) > 1
