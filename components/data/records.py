"""Reading raw records and reading/writing text datasets as parquet shards."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from components.errors import DataError

DATA_DIR = "data"  # parquet shards of a dataset artifact live under this directory


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, record) from a .jsonl or .jsonl.gz file.

    Blank lines are skipped; anything else that is not a JSON object fails with the file
    and line number.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{line_no}: malformed JSON: {error.msg}") from None
                if not isinstance(record, dict):
                    raise DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
                yield line_no, record
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not valid UTF-8 (byte offset {error.start})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None


def format_record(template: str, record: dict[str, Any], where: str) -> str:
    """Fill `template` ("{question} ...") from a record; a missing field is named."""
    try:
        return template.format_map(record)
    except KeyError as error:
        raise DataError(f"{where}: missing field {error.args[0]!r} (record has {sorted(record)})") from None
    except (IndexError, ValueError, AttributeError) as error:
        raise DataError(f"text_template {template!r} cannot be filled from a record: {error}") from None


def write_shards(out_dir: Path, columns: dict[str, Sequence[Any]], rows_per_shard: int) -> int:
    """Write columns as `data/part-NNNNN.parquet` shards; returns the number of shards."""
    table = pa.table(columns)
    shard_dir = out_dir / DATA_DIR
    shard_dir.mkdir(parents=True, exist_ok=True)
    num_shards = max(1, -(-table.num_rows // rows_per_shard))
    for index in range(num_shards):
        shard = table.slice(index * rows_per_shard, rows_per_shard)
        pq.write_table(shard, shard_dir / f"part-{index:05d}.parquet")
    return num_shards


def read_column(artifact_dir: Path, column: str) -> list[Any]:
    """One column of a dataset artifact, all shards in order; a missing column is named."""
    shards = sorted((artifact_dir / DATA_DIR).glob("part-*.parquet"))
    if not shards:
        raise DataError(f"{artifact_dir}: no parquet shards under {DATA_DIR}/")
    values: list[Any] = []
    for shard in shards:
        table = pq.read_table(shard)
        if column not in table.column_names:
            raise DataError(f"{shard}: missing column {column!r} (has {table.column_names})")
        values.extend(table.column(column).to_pylist())
    return values
