"""SFT data: records -> chat-templated examples with an assistant-only loss -> packed blocks.

Formats (the column names each needs):
- `gsm8k`: `question`, `answer` (a two-turn chat; the answer ends in `#### N`);
- `prompt_completion`: `prompt`, `completion` (TRL's prompt-completion format, as text);
- `messages`: `messages`, a list of {role, content} (TRL's conversational format).

Every example is rendered with the tokenizer's chat template (`apply_chat_template`), the
loss mask keeps the assistant tokens only, and examples are packed whole into blocks with
per-document position ids (`sft_pack.pack_sft`), or, with `packing: false`, stored one per
row, right-padded (what prompt tuning and per-example evaluation need). A `select` input (a
curation artifact) keeps only the records curation kept, by their `source_row`: line numbers
of the file curation read, so a selection is refused for any other file (its manifest records
that file's content hash). The tokenizer's fingerprint is recorded in the metrics, so `sft`
can check the model it trains has the tokenizer of these ids.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.artifacts import ArtifactRef, ComponentSpec, Manifest, input_ref, produce, read_manifest
from components.config import StrictConfig
from components.data.formats import SFTChat, SFTPromptCompletion, gsm8k_to_chat, validate_record
from components.data.sft_pack import fit_examples, pack_sft, tokenize_chat, tokenize_prompt_completion
from components.errors import DataError
from components.models.chat import IGNORE_INDEX, TokenizedExample
from components.models.tokenizers import FINGERPRINT_KEY, fingerprint_of
from components.records import DATA_DIR, SOURCE_ROW, iter_records, read_column

SPEC = ComponentSpec(name="sft_data", version="1")
DATA_FILE = "part-00000.parquet"

SFTFormat = Literal["gsm8k", "prompt_completion", "messages"]
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "gsm8k": ("question", "answer"),
    "prompt_completion": ("prompt", "completion"),
    "messages": ("messages",),
}


class SFTDataConfig(StrictConfig):
    format: SFTFormat = "gsm8k"
    seq_len_tokens: int = Field(512, ge=2, description="Block width (packing) or the longest row allowed.")
    truncate: bool = Field(True, description="Cut longer examples and count them; false makes them an error.")
    packing: bool = Field(True, description="Pack whole examples into blocks; false: one right-padded example per row.")
    max_examples: int | None = Field(None, gt=0, description="Use only the first N (selected) records.")


def _tokenizer_fn(fmt: str, tokenizer: Any) -> Callable[[dict[str, Any], str], TokenizedExample]:
    if fmt == "gsm8k":
        return lambda record, where: tokenize_chat(tokenizer, gsm8k_to_chat(record, where))
    if fmt == "prompt_completion":
        return lambda record, where: tokenize_prompt_completion(tokenizer, validate_record(SFTPromptCompletion, record, where))
    return lambda record, where: tokenize_chat(tokenizer, validate_record(SFTChat, record, where))


def tokenized_examples(
    path: Path, fmt: str, tokenizer: Any, select_lines: set[int] | None = None, max_examples: int | None = None,
) -> list[TokenizedExample]:
    """(input_ids, labels) per record of `path`; a record without the format's columns is named."""
    required = REQUIRED_COLUMNS[fmt]
    tokenize = _tokenizer_fn(fmt, tokenizer)
    examples: list[TokenizedExample] = []
    for line, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        if select_lines is not None and line not in select_lines:
            continue
        missing = [column for column in required if column not in record]
        if missing:
            raise DataError(
                f"{path}:{line}: missing column(s) {missing} for SFT format {fmt!r} (record has {sorted(record)})"
            )
        examples.append(tokenize(record, f"{path}:{line}"))
        if max_examples is not None and len(examples) >= max_examples:
            break
    if not examples:
        selected = " after selecting the curated records" if select_lines is not None else ""
        raise DataError(f"{path}: no SFT examples{selected} (the dataset is empty)")
    return examples


def pad_examples(
    examples: list[TokenizedExample], seq_len_tokens: int, pad_id: int, truncate: bool, source: str,
) -> dict[str, Any]:
    """One example per row, right-padded to the longest (labels -100 on the padding)."""
    fitted, truncated, cut_tokens, dropped = fit_examples(examples, seq_len_tokens, truncate, source)
    width = max(len(ids) for ids, _ in fitted)
    input_ids = [ids + [pad_id] * (width - len(ids)) for ids, _ in fitted]
    labels = [lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in fitted]
    real = sum(len(ids) for ids, _ in fitted)
    stats = {"examples": len(fitted), "rows": len(fitted), "truncated": truncated, "truncated_tokens": cut_tokens,
             "dropped_no_loss_tokens": dropped, "padding_tokens": len(fitted) * width - real,
             "loss_tokens": sum(label != IGNORE_INDEX for row in labels for label in row[1:])}
    return {"input_ids": input_ids, "labels": labels, "stats": stats}


def _build(config: SFTDataConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    select = set(read_column(paths["select"], SOURCE_ROW)) if "select" in paths else None
    examples = tokenized_examples(paths["dataset"], config.format, tokenizer, select, config.max_examples)
    source = str(paths["dataset"])
    if config.packing:
        columns = pack_sft(examples, config.seq_len_tokens, tokenizer.pad_token_id, truncate=config.truncate, source=source)
    else:
        columns = pad_examples(examples, config.seq_len_tokens, tokenizer.pad_token_id, config.truncate, source)
    stats = columns.pop("stats")
    (out_dir / DATA_DIR).mkdir()
    table = pa.table({name: pa.array(values, pa.list_(pa.int32())) for name, values in columns.items()})
    pq.write_table(table, out_dir / DATA_DIR / DATA_FILE)
    width = len(columns["input_ids"][0])
    return {**stats, "width_tokens": width, "fill_ratio": round(1 - stats["padding_tokens"] / (len(columns["input_ids"]) * width), 4),
            FINGERPRINT_KEY: fingerprint_of(tokenizer)}


def check_selection_source(select: str, dataset: ArtifactRef) -> None:
    """Refuse a curation selection made from another file than `dataset`.

    `select` keeps records by line number (`source_row`) of the file curation read: applied
    to any other file it keeps arbitrary records (300 user chats became 248 with GSM8K's kept
    line numbers). The curate artifact's manifest records its input's content hash, so the
    check costs one manifest read.
    """
    curated_from = read_manifest(select).inputs.get("input")
    if curated_from is None:
        raise DataError(f"select {select}: not a curation artifact (its manifest records no `input`); "
                        "a selection must be the `curate` output made from the dataset")
    if curated_from.content_hash != dataset.content_hash:
        raise DataError(
            f"select {select} was curated from {curated_from.uri} ({curated_from.content_hash[:19]}), not from the "
            f"dataset {dataset.uri} ({dataset.content_hash[:19]}); its kept line numbers mean nothing for another file: "
            "curate this dataset, or drop `select`"
        )


def sft_data(config: SFTDataConfig, dataset: str, tokenizer: str, dest: str, select: str | None = None,
             overwrite: bool = False) -> Manifest:
    """Tokenize `dataset` with `tokenizer`'s chat template and pack it (see the module doc)."""
    dataset_ref = input_ref(dataset)  # resolved once: for the selection check and for `produce`
    if select:
        check_selection_source(select, dataset_ref)
    inputs = {"dataset": dataset_ref, "tokenizer": tokenizer, **({"select": select} if select else {})}
    return produce(SPEC, config, inputs, dest, lambda out_dir, paths: _build(config, paths, out_dir), overwrite=overwrite)
