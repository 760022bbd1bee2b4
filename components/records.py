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
# The column naming the input record a curated row came from: iter_records' row number, i.e. the
# 1-based line of a jsonl file (as in error messages; blank lines count) or the 1-based row of
# a parquet file or datasets directory. Kept and removed rows use the same name.
SOURCE_ROW = "source_row"


def _jsonl_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    yield line_no, line
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as error:  # e.g. a truncated or non-gzip .gz file
        raise DataError(f"{path}: cannot read: {error}") from None


def _parse_jsonl_line(path: Path, line_no: int, line: bytes) -> dict[str, Any] | DataError:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return DataError(f"{path}:{line_no}: not valid UTF-8 (byte {error.start} of the line)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        return DataError(f"{path}:{line_no}: malformed JSON: {error.msg}")
    if not isinstance(record, dict):
        return DataError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
    return record


def iter_records(path: Path, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, Any] | DataError]]:
    """Yield (row number, record or the DataError that row raised) for records [start, stop).

    Reads .jsonl / .jsonl.gz (row number = 1-based line; blank lines are not records),
    .parquet files and `datasets.save_to_disk` directories (row number = 1-based row).
    Bad rows are yielded, not raised, so the caller can fail or skip and count them.
    """
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        stop = len(dataset) if stop is None else min(stop, len(dataset))
        for index in range(start, stop):
            yield index + 1, dataset[index]
    elif path.suffix == ".parquet":
        table = pq.read_table(path)
        stop = table.num_rows if stop is None else min(stop, table.num_rows)
        for offset, record in enumerate(table.slice(start, max(0, stop - start)).to_pylist()):
            yield start + offset + 1, record
    else:
        for index, (line_no, line) in enumerate(_jsonl_lines(path)):
            if index < start:
                continue
            if stop is not None and index >= stop:
                return
            yield line_no, _parse_jsonl_line(path, line_no, line)


def count_records(path: Path) -> int:
    """Number of records `iter_records` would yield (cheap: no JSON parsing)."""
    if path.is_dir():
        from datasets import load_from_disk

        return len(load_from_disk(str(path)))
    if path.suffix == ".parquet":
        return pq.ParquetFile(path).metadata.num_rows
    return sum(1 for _ in _jsonl_lines(path))


def read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, record) from a .jsonl or .jsonl.gz file; the first bad
    line fails with the file and line number."""
    for line_no, record in iter_records(path):
        if isinstance(record, DataError):
            raise record
        yield line_no, record


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


def column_names(artifact_dir: Path) -> set[str]:
    """The columns of a dataset artifact (its first shard's schema); empty without shards."""
    shards = sorted((artifact_dir / DATA_DIR).glob("part-*.parquet"))
    return set(pq.read_schema(shards[0]).names) if shards else set()


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
