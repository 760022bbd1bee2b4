"""Data components on concrete inputs: curate, tokenizer, pack."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from components.data.curate import CurateConfig, curate
from components.data.pack import PackConfig, pack, pack_stream
from components.data.records import read_column
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from components.errors import DataError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_curate_normalises_and_drops_exact_duplicates(tmp_path: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"question": "Cafe\u0301  costs?", "answer": "  4 \t dollars "},   # decomposed é, messy spaces
        {"question": "Caf\u00e9 costs?", "answer": "4 dollars"},          # same text once normalised
        {"question": "Other", "answer": "5"},
    ])
    manifest = curate(CurateConfig(), str(raw), str(tmp_path / "out"))
    assert read_column(tmp_path / "out", "text") == ["Question: Caf\u00e9 costs?\nAnswer: 4 dollars", "Question: Other\nAnswer: 5"]
    assert read_column(tmp_path / "out", "source_line") == [1, 3]
    assert manifest.metrics["docs_in"] == 3
    assert manifest.metrics["removed_exact_duplicate"] == 1


def test_curate_without_dedup_keeps_duplicates(tmp_path: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"question": "a", "answer": "b"}] * 2)
    curate(CurateConfig(exact_dedup=False), str(raw), str(tmp_path / "out"))
    assert len(read_column(tmp_path / "out", "text")) == 2


def test_curate_reads_gzip(tmp_path: Path) -> None:
    path = tmp_path / "raw.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert curate(CurateConfig(), str(path), str(tmp_path / "out")).metrics["docs_out"] == 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b'{"question": "q", "answer": "a"}\n{"question": \n', r"raw.jsonl:2: malformed JSON"),
        (b'{"question": "q"}\n', r"raw.jsonl:1: missing field 'answer'"),
        (b'[1, 2]\n', r"raw.jsonl:1: expected a JSON object, got list"),
        (b'{"question": "q\xff", "answer": "a"}\n', r"raw.jsonl: not valid UTF-8"),
        (b"\n\n", r"raw.jsonl: empty corpus"),
    ],
)
def test_curate_bad_input_is_named_and_nothing_is_published(tmp_path: Path, content: bytes, expected: str) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        curate(CurateConfig(), str(raw), str(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.jsonl"]


def test_pack_stream_joins_with_eos_and_drops_the_tail() -> None:
    blocks, dropped = pack_stream([[1, 2, 3], [4], [5, 6]], eos_id=0, seq_len_tokens=3)
    assert blocks == [[1, 2, 3], [0, 4, 0], [5, 6, 0]]
    assert dropped == 0
    blocks, dropped = pack_stream([[1, 2, 3, 4]], eos_id=0, seq_len_tokens=3)
    assert blocks == [[1, 2, 3]] and dropped == 2


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    rows = [{"question": f"What is {i} plus {i + 1}?", "answer": f"It is {2 * i + 1}. #### {2 * i + 1}"} for i in range(200)]
    curate(CurateConfig(), str(write_jsonl(tmp_path / "raw.jsonl", rows)), str(tmp_path / "dataset"))
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
