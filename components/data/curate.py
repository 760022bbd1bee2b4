"""Curate raw records into a text dataset: format, normalise, drop empties and exact duplicates.

This is the spine's first stage; the full curation component (quality filters, fuzzy
dedup, decontamination, PII) extends it behind the same entry point.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.data.records import format_record, read_jsonl, write_shards
from components.errors import DataError

SPEC = ComponentSpec(name="curate", version="1")

_HORIZONTAL_SPACE = re.compile(r"[ \t\f\v\u00a0]+")


class CurateConfig(StrictConfig):
    text_template: str = Field(
        "Question: {question}\nAnswer: {answer}",
        description="str.format template applied to each raw JSON record to make a document.",
    )
    unicode_form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normalisation of the kept text.")
    collapse_whitespace: bool = Field(True, description="Collapse runs of spaces/tabs, strip each line.")
    exact_dedup: bool = Field(True, description="Drop documents whose normalised text was already seen.")
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this after normalisation.")
    max_docs: int | None = Field(None, gt=0, description="Read only the first N records (smoke runs).")
    rows_per_shard: int = Field(50_000, gt=0, description="Rows per output parquet shard.")


def normalize_text(text: str, config: CurateConfig) -> str:
    text = unicodedata.normalize(config.unicode_form, text)
    if config.collapse_whitespace:
        text = "\n".join(_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.splitlines()).strip()
    return text


def _build(config: CurateConfig, source: Path, out_dir: Path) -> dict[str, Any]:
    texts: list[str] = []
    source_rows: list[int] = []
    seen: set[bytes] = set()
    docs_in = removed_short = removed_duplicate = 0
    for line_no, record in read_jsonl(source):
        if config.max_docs is not None and docs_in >= config.max_docs:
            break
        docs_in += 1
        text = normalize_text(format_record(config.text_template, record, f"{source}:{line_no}"), config)
        if len(text) < config.min_chars:
            removed_short += 1
            continue
        if config.exact_dedup:
            digest = hashlib.sha256(text.encode()).digest()
            if digest in seen:
                removed_duplicate += 1
                continue
            seen.add(digest)
        texts.append(text)
        source_rows.append(line_no)
    if docs_in == 0:
        raise DataError(f"{source}: empty corpus (no records)")
    if not texts:
        raise DataError(f"{source}: every one of {docs_in} documents was removed; nothing to publish")
    shards = write_shards(out_dir, {"text": texts, "source_line": source_rows}, config.rows_per_shard)
    return {
        "docs_in": docs_in,
        "docs_out": len(texts),
        "removed_short": removed_short,
        "removed_exact_duplicate": removed_duplicate,
        "chars_out": sum(map(len, texts)),
        "shards": shards,
    }


def curate(config: CurateConfig, input: str, dest: str, overwrite: bool = False) -> Manifest:
    """Curate the raw jsonl at `input` into a text dataset artifact at `dest`."""
    return produce(
        SPEC, config, {"input": input}, dest,
        lambda out_dir, paths: _build(config, paths["input"], out_dir),
        overwrite=overwrite,
    )
