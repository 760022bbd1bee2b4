"""Data components on concrete inputs: curate, tokenizer, pack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.data.curate import curate
from components.data.pack import PackConfig, pack, pack_stream
from components.records import read_column
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from flows.params import heldout_curation

NORMALISE_ONLY = heldout_curation()  # no filters or dedup: these tests need every document


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_pack_stream_joins_with_eos_and_drops_the_tail() -> None:
    blocks, dropped = pack_stream([[1, 2, 3], [4], [5, 6]], eos_id=0, seq_len_tokens=3)
    assert blocks == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    assert dropped == 0
    blocks, dropped = pack_stream([[1, 2, 3, 4]], eos_id=0, seq_len_tokens=3)
    assert blocks == [[1, 2, 3]] and dropped == 2


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"It is {2 * i + 1}. #### {2 * i + 1}"} for i in range(200)]
    curate(NORMALISE_ONLY, str(write_jsonl(tmp_path / "raw.jsonl", rows)), str(tmp_path / "dataset"))
    return tmp_path / "dataset"


def test_tokenizer_trains_loads_round_trips_and_has_a_chat_template(corpus: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    manifest = train_tokenizer(TokenizerConfig(vocab_size=300), str(corpus), str(tmp_path / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tokenizer) == manifest.metrics["vocab_size"] <= 300
    text = "What is 12 plus 13? Ünïcödé ✓"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    messages = [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>\n"
    out = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tokenizer.decode(masked) == "2<|im_end|>"


def test_pack_blocks_have_the_configured_length(corpus: Path, tmp_path: Path) -> None:
    train_tokenizer(TokenizerConfig(vocab_size=300), str(corpus), str(tmp_path / "tok"))
    manifest = pack(PackConfig(seq_len_tokens=16), str(corpus), str(tmp_path / "tok"), str(tmp_path / "blocks"))
    blocks = read_column(tmp_path / "blocks", "input_ids")
    assert len(blocks) == manifest.metrics["blocks"] > 0
    assert {len(b) for b in blocks} == {16}
    assert manifest.metrics["tokens"] + manifest.metrics["dropped_tail_tokens"] == sum(
        len(ids) + 1 for ids in _token_lists(corpus, tmp_path / "tok")
    )


def _token_lists(dataset: Path, tokenizer_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return tokenizer(read_column(dataset, "text"), add_special_tokens=False)["input_ids"]


def test_sft_data_select_keeps_exactly_the_rows_curation_kept(tmp_path: Path) -> None:
    """sft_data's `select` reads curation's `source_row`: rows curation removed (here too short)
    never reach the SFT examples, and every kept row does, a blank line in the file included."""
    from components.data.sft_data import SFTDataConfig, sft_data
    from components.models.chat import IGNORE_INDEX
    from transformers import AutoTokenizer

    rows = [{"question": f"How many apples does Ann have if she buys {i} and then {i + 2} more?",
             "answer": f"She has {i} + {i + 2} = {2 * i + 2} apples.\n#### {2 * i + 2}"} for i in range(8)]
    rows[2] = rows[5] = {"question": "Hi?", "answer": "#### 7777"}  # removed: shorter than min_chars
    raw = tmp_path / "raw.jsonl"
    lines = [json.dumps(row) for row in rows]
    raw.write_text("\n".join(lines[:4] + [""] + lines[4:]) + "\n", encoding="utf-8")
    config = NORMALISE_ONLY.model_copy(update={"min_chars": 40})
    curated = curate(config, str(raw), str(tmp_path / "curated"))
    assert curated.metrics["removed"] == {"too_short": 2}
    train_tokenizer(TokenizerConfig(vocab_size=300), str(tmp_path / "curated"), str(tmp_path / "tok"))
    manifest = sft_data(SFTDataConfig(seq_len_tokens=128, packing=False), str(raw), str(tmp_path / "tok"),
                        str(tmp_path / "sft"), select=str(tmp_path / "curated"))
    assert manifest.metrics["examples"] == 6
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    labels = read_column(tmp_path / "sft", "labels")
    answers = [tokenizer.decode([t for t in row if t != IGNORE_INDEX]) for row in labels]
    expected = [row["answer"].split("#### ")[1] for i, row in enumerate(rows) if i not in (2, 5)]
    assert [answer.split("#### ")[1].split("<")[0].strip() for answer in answers] == expected
