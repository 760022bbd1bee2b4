"""Tokenize documents and pack them into fixed-length blocks for causal-LM pretraining.

Documents are joined with EOS into one stream and cut into blocks of `seq_len_tokens`
(the "concatenate and chunk" packing of GPT-2/3 pretraining); the tail that does not fill
a block is dropped and counted. The tokenizer's fingerprint goes into the metrics, so the
stages that read these ids (`evaluate`'s unigram baseline) can check they share its tokenizer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.records import read_column, write_shards
from components.errors import DataError
from components.models.tokenizers import FINGERPRINT_KEY, fingerprint_of

SPEC = ComponentSpec(name="pack", version="1")


class PackConfig(StrictConfig):
    seq_len_tokens: int = Field(256, ge=8, description="Tokens per packed block.")
    rows_per_shard: int = Field(20_000, gt=0, description="Blocks per output parquet shard.")


def pack_stream(token_lists: list[list[int]], eos_id: int, seq_len_tokens: int) -> tuple[list[list[int]], int]:
    """Join documents with EOS and cut into blocks; returns (blocks, dropped tail tokens)."""
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    num_blocks = len(stream) // seq_len_tokens
    blocks = [stream[i * seq_len_tokens:(i + 1) * seq_len_tokens] for i in range(num_blocks)]
    return blocks, len(stream) - num_blocks * seq_len_tokens


def _build(config: PackConfig, dataset: Path, tokenizer_dir: Path, out_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = read_column(dataset, "text")
    token_lists = tokenizer(texts, add_special_tokens=False)["input_ids"]
    blocks, dropped = pack_stream(token_lists, tokenizer.eos_token_id, config.seq_len_tokens)
    if not blocks:
        raise DataError(f"{dataset}: {sum(map(len, token_lists))} tokens do not fill one block of {config.seq_len_tokens}")
    shards = write_shards(out_dir, {"input_ids": blocks}, config.rows_per_shard)
    return {
        "docs": len(texts),
        "blocks": len(blocks),
        "seq_len_tokens": config.seq_len_tokens,
        "tokens": len(blocks) * config.seq_len_tokens,
        "dropped_tail_tokens": dropped,
        "shards": shards,
        FINGERPRINT_KEY: fingerprint_of(tokenizer),
    }


def pack(config: PackConfig, dataset: str, tokenizer: str, dest: str, overwrite: bool = False) -> Manifest:
    """Pack the `text` column of `dataset` into token blocks with the tokenizer at `tokenizer`."""
    return produce(
        SPEC, config, {"dataset": dataset, "tokenizer": tokenizer}, dest,
        lambda out_dir, paths: _build(config, paths["dataset"], paths["tokenizer"], out_dir),
        overwrite=overwrite,
    )
