"""Curate raw text into training-ready documents: normalise, filter, redact PII,
decontaminate, exact- and fuzzy-dedup — sharded and resumable.

Two phases, each a component run with its own artifact (so a crash redoes only what was
not published):

1. per shard (`curate_shard`): read a contiguous range of records, build each document's
   text, normalise it, apply the quality filters, drop documents that share a 13-gram with
   the evaluation set, redact PII, and compute the exact-dedup key and MinHash signature
   of what survives. Shards are independent, so a driver may run them in parallel: the
   entry point takes a `map_shards` function (the built-in sequential `map` by default;
   the Prefect flow passes one that fans out over its task runner, Dask included).
2. merge (`curate`): exact dedup then MinHash-LSH fuzzy dedup across all shards, in shard
   order, keeping the first document of each cluster. Only keys and signatures are held in
   memory (the LSH index); texts stream through shard by shard.

Every removed document is kept in `removed/` with its `reason` (and `cluster_id`, the
`doc_id` of the document kept in its place, for duplicates; `matched_eval_ids` for
decontamination), so a user can see why any document went. Kept and removed rows name their
input record the same way (`source_row`) and carry the input fields named in
`passthrough_fields` (an `id`, a `url`, ...) unchanged, as datatrove keeps a document's `id` and
`metadata`, so a curated row can be joined back to the user's own data.
"""

from __future__ import annotations

import re
import unicodedata
import json
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from components.artifacts import (
    ArtifactRef, ComponentSpec, Manifest, input_ref, materialize, produce, read_manifest,
)
from components.config import StrictConfig
from components.data.decontaminate import DecontaminationConfig, NgramIndex
from components.data.dedup import (
    ExactDedupConfig, FuzzyDedupConfig, Permutations, exact_key, fuzzy_clusters, make_permutations, minhash_signature,
)
from components.data.filters import FiltersConfig, WordTokenizer, english_word_tokenizer, run_filters
from components.data.pii import PIIConfig, redact_pii
from components.records import DATA_DIR, SOURCE_ROW, count_records, format_record, iter_records
from components.errors import DataError

SPEC = ComponentSpec(name="curate", version="3")  # 3: `source_row` on kept rows, passthrough fields
SHARD_SPEC = ComponentSpec(name="curate_shard", version="3")
REMOVED_DIR = "removed"
KEPT_FILE = "kept.parquet"
REMOVED_FILE = "removed.parquet"
METRICS_FILE = "metrics.json"  # flat counts, declared as DVC metrics
TABLES_FILE = "tables.json"  # per-reason and per-shard rows, published as Prefect tables

_HORIZONTAL_SPACE = re.compile(r"[ \t\f\v\u00a0]+")
T = TypeVar("T")
R = TypeVar("R")
MapShards = Callable[[Callable[[T], R], list[T]], Iterable[R]]
FieldTypes = dict[str, pa.DataType | None]  # passthrough field -> its column type (None: inferred)
# Columns the component writes itself (kept, removed, and the shards' dedup keys): a
# passthrough field of one of these names would overwrite them.
RESERVED_COLUMNS = frozenset({"text", SOURCE_ROW, "doc_id", "reason", "cluster_id", "matched_eval_ids", "detail",
                              "exact_key", "signature"})


class NormalizeConfig(StrictConfig):
    unicode_form: Literal["NFC", "NFKC"] = Field("NFC", description="Unicode normalisation of the kept text.")
    collapse_whitespace: bool = Field(True, description="Collapse runs of spaces/tabs and strip each line.")
    lowercase_for_matching: bool = Field(
        True, description="Lowercase for dedup keys only; the kept text keeps its case."
    )


class CurateConfig(StrictConfig):
    text_field: str | None = Field(None, description="Use this field as the text (else `text_template`).")
    text_template: str = Field(
        "Question: {question}\nAnswer: {answer}",
        description="str.format template applied to each record when `text_field` is not set.",
    )
    on_error: Literal["fail", "skip"] = Field("fail", description="A malformed record fails the run, or is skipped and counted.")
    max_docs: int | None = Field(None, gt=0, description="Read only the first N records (smoke runs).")
    num_shards: int = Field(4, ge=1, description="Shards processed independently (in parallel under a task runner).")
    min_chars: int = Field(1, ge=0, description="Drop documents shorter than this after normalisation.")
    normalize: NormalizeConfig = NormalizeConfig()
    filters: FiltersConfig = FiltersConfig()
    pii: PIIConfig = PIIConfig()
    decontamination: DecontaminationConfig = DecontaminationConfig()
    exact_dedup: ExactDedupConfig = ExactDedupConfig()
    fuzzy_dedup: FuzzyDedupConfig = FuzzyDedupConfig()
    passthrough_fields: tuple[str, ...] = Field(
        (), description="Input fields copied unchanged onto every kept and removed row, one column each "
                        "(e.g. [id, url]); a record without one of them is a malformed record.")

    @field_validator("passthrough_fields")
    @classmethod
    def _no_reserved_or_repeated(cls, fields: tuple[str, ...]) -> tuple[str, ...]:
        clashes = sorted(set(fields) & RESERVED_COLUMNS)
        if clashes:
            raise ValueError(f"{clashes} would overwrite curate's own columns {sorted(RESERVED_COLUMNS)}")
        repeated = sorted({field for field in fields if fields.count(field) > 1})
        if repeated:
            raise ValueError(f"{repeated} listed more than once")
        return fields


class ShardConfig(StrictConfig):
    curate: CurateConfig
    index: int = Field(ge=0)
    num_shards: int = Field(ge=1)
    total_records: int = Field(ge=0)

    @property
    def row_range(self) -> tuple[int, int]:
        start = self.index * self.total_records // self.num_shards
        return start, (self.index + 1) * self.total_records // self.num_shards


def normalize_text(text: str, config: NormalizeConfig) -> str:
    text = unicodedata.normalize(config.unicode_form, text)
    if config.collapse_whitespace:
        text = "\n".join(_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.splitlines()).strip()
    return text


def _record_text(text_field: str | None, text_template: str, record: dict[str, Any], where: str) -> str:
    """The record's `text_field`, or else `text_template` filled from it; a bad record is named."""
    if text_field is None:
        return format_record(text_template, record, where)
    if text_field not in record:
        raise DataError(f"{where}: missing field {text_field!r} (record has {sorted(record)})")
    value = record[text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} is {type(value).__name__}, expected a string")
    return value


def _eval_reading(config: CurateConfig) -> tuple[str | None, str]:
    """(text_field, text_template) for evaluation records: their own, else the corpus's."""
    decontamination = config.decontamination
    if decontamination.reads_own_text:
        return decontamination.text_field, decontamination.text_template or ""
    return config.text_field, config.text_template


def _eval_text(config: CurateConfig, record: dict[str, Any], where: str) -> str:
    try:
        return _record_text(*_eval_reading(config), record, where)
    except DataError as error:
        if config.decontamination.reads_own_text:
            raise
        raise DataError(f"{error} (the evaluation set is read like the corpus; set decontamination.text_field or "
                        "decontamination.text_template to read it differently)") from None


def _eval_index(config: CurateConfig, eval_path: Path | None) -> NgramIndex | None:
    if eval_path is None or not config.decontamination.enabled:
        return None
    texts, ids = [], []
    for row, record in iter_records(eval_path):
        if isinstance(record, DataError):
            raise record
        texts.append(normalize_text(_eval_text(config, record, f"{eval_path}:{row}"), config.normalize))
        ids.append(f"{eval_path.name}:{row}")
    return NgramIndex.from_texts(texts, ids, config.decontamination.ngram_words)


def _passthrough(fields: tuple[str, ...], record: dict[str, Any], where: str) -> dict[str, Any]:
    missing = [field for field in fields if field not in record]
    if missing:
        raise DataError(f"{where}: missing passthrough field(s) {missing} (record has {sorted(record)})")
    return {field: record[field] for field in fields}


def _passthrough_column(values: list[Any], field: str, where: str, type: pa.DataType | None = None) -> pa.Array:
    """One column of a passthrough field; values that parquet cannot hold in one column are named."""
    try:
        return pa.array(values, type)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as error:
        raise DataError(f"{where}: passthrough field {field!r} cannot be one parquet column: {error}") from None


def _matching_text(text: str, config: NormalizeConfig) -> str:
    return text.lower() if config.lowercase_for_matching else text


def _screen(text: str, config: CurateConfig, tokenizer: WordTokenizer,
            eval_index: NgramIndex | None) -> tuple[str, str | None, list[str]]:
    """(text after the filters, the reason it is dropped or None, the evaluation ids it matched)."""
    if len(text) < config.min_chars:
        return text, "too_short", []
    filtered, reason = run_filters(text, config.filters, tokenizer)
    if filtered is None:
        return text, reason or "filtered", []
    # Decontaminate before redaction, so a placeholder cannot break a 13-gram match.
    if eval_index is not None and (matched := eval_index.matches(filtered)):
        return filtered, "decontaminated", matched
    return filtered, None, []


class _ShardRows:
    """One shard's phase-1 rows as they are screened: kept and removed columns, and the counts."""

    def __init__(self, fields: tuple[str, ...]) -> None:
        self.fields = fields
        self.kept: dict[str, list] = {name: [] for name in ("text", SOURCE_ROW, "exact_key", "signature", *fields)}
        self.removed: dict[str, list] = {name: [] for name in
                                         ("text", SOURCE_ROW, "reason", "matched_eval_ids", "detail", *fields)}
        self.reasons: Counter[str] = Counter()
        self.removed_words: Counter[str] = Counter()
        self.pii_counts: Counter[str] = Counter()
        self.words_in = self.words_out = 0

    def drop(self, text: str, row: int, reason: str, passed: dict[str, Any] | None, matched: list[str] | None = None,
             detail: str | None = None) -> None:
        """Record a removed document with its reason (and the evaluation ids it matched, or the error)."""
        self.reasons[reason] += 1
        self.removed_words[reason] += len(text.split())
        for column, value in (("text", text), (SOURCE_ROW, row), ("reason", reason),
                              ("matched_eval_ids", matched or []), ("detail", detail)):
            self.removed[column].append(value)
        for field in self.fields:
            self.removed[field].append(passed[field] if passed is not None else None)


def _screen_record(rows: _ShardRows, config: CurateConfig, source: Path, row: int, record: dict[str, Any] | DataError,
                   tokenizer: WordTokenizer, eval_index: NgramIndex | None, permutations: Permutations) -> None:
    """Build, normalise, filter and redact one record's document into `rows`: kept with its dedup keys, or dropped."""
    fields = rows.fields
    where = f"{source}:{row}"
    try:
        if isinstance(record, DataError):
            raise record
        raw_text = _record_text(config.text_field, config.text_template, record, where)
        passed = _passthrough(fields, record, where)
    except DataError as error:
        if config.on_error == "fail":
            raise
        rows.drop("", row, "malformed_record", None, detail=str(error))
        return
    text = normalize_text(raw_text, config.normalize)
    rows.words_in += len(text.split())
    text, reason, matched = _screen(text, config, tokenizer, eval_index)
    if reason is not None:
        rows.drop(text, row, reason, passed, matched)
        return
    if config.pii.enabled:
        text, counts = redact_pii(text, config.pii)
        rows.pii_counts.update(counts)
    matching = _matching_text(text, config.normalize)
    signature = minhash_signature(matching, config.fuzzy_dedup, permutations)
    for column, value in (("text", text), (SOURCE_ROW, row), ("exact_key", exact_key(matching)),
                          ("signature", signature), *passed.items()):
        rows.kept[column].append(value)
    rows.words_out += len(text.split())


def _write_shard(rows: _ShardRows, config: CurateConfig, source: Path, shard_index: int, out_dir: Path) -> None:
    """kept.parquet (text, source row, exact key, MinHash signature, passthrough fields) and removed.parquet."""
    kept, removed, fields = rows.kept, rows.removed, rows.fields
    where, inferred = f"{source} (shard {shard_index})", dict.fromkeys(fields)
    pq.write_table(pa.table({
        "text": pa.array(kept["text"], pa.string()),
        SOURCE_ROW: pa.array(kept[SOURCE_ROW], pa.int64()),
        "exact_key": pa.array(kept["exact_key"], pa.binary()),
        "signature": _signature_column(kept["signature"], config.fuzzy_dedup.num_hashes),
        **_passthrough_columns(kept, inferred, where),
    }), out_dir / KEPT_FILE)
    pq.write_table(_removed_table(removed, inferred, where), out_dir / REMOVED_FILE)


def _build_shard(shard: ShardConfig, source: Path, eval_path: Path | None, out_dir: Path) -> dict[str, Any]:
    config, fields = shard.curate, shard.curate.passthrough_fields
    start, stop = shard.row_range
    tokenizer = english_word_tokenizer()
    eval_index = _eval_index(config, eval_path)
    permutations = make_permutations(config.fuzzy_dedup)
    rows = _ShardRows(fields)
    for row, record in iter_records(source, start, stop):
        _screen_record(rows, config, source, row, record, tokenizer, eval_index, permutations)
    _write_shard(rows, config, source, shard.index, out_dir)
    return {
        "shard": shard.index, "rows": [start, stop], "docs_in": stop - start, "docs_kept": len(rows.kept["text"]),
        "words_in": rows.words_in, "words_kept": rows.words_out, "removed": dict(sorted(rows.reasons.items())),
        "removed_words": dict(sorted(rows.removed_words.items())),
        "pii_redacted": dict(sorted(rows.pii_counts.items())),
    }


def _signature_column(signatures: list[np.ndarray], num_hashes: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(signatures) if signatures else np.empty(0, dtype=np.uint64)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint64()), num_hashes)


def _passthrough_columns(columns: dict[str, list], types: FieldTypes, where: str) -> dict[str, pa.Array]:
    return {field: _passthrough_column(columns[field], field, where, type) for field, type in types.items()}


def _removed_table(removed: dict[str, list], types: FieldTypes, where: str) -> pa.Table:
    return pa.table({
        "text": pa.array(removed["text"], pa.string()),
        SOURCE_ROW: pa.array(removed[SOURCE_ROW], pa.int64()),
        "reason": pa.array(removed["reason"], pa.string()),
        "cluster_id": pa.array(removed.get("cluster_id", [None] * len(removed["text"])), pa.string()),
        "matched_eval_ids": pa.array(removed["matched_eval_ids"], pa.list_(pa.string())),
        "detail": pa.array(removed["detail"], pa.string()),
        **_passthrough_columns(removed, types, where),
    })


def curate_shard(shard: ShardConfig, input: str | ArtifactRef, dest: str,
                 decontaminate_against: str | ArtifactRef | None = None,
                 overwrite: bool = False) -> Manifest:
    """Phase 1 for one shard: its own artifact, so a rerun after a crash skips it if done."""
    inputs = {"input": input, **({"decontaminate_against": decontaminate_against} if decontaminate_against else {})}
    return produce(
        SHARD_SPEC, shard, inputs, dest,
        lambda out_dir, paths: _build_shard(shard, paths["input"], paths.get("decontaminate_against"), out_dir),
        overwrite=overwrite,
    )


def _doc_id(shard_index: int, row: int) -> str:
    return f"{shard_index}:{row}"


_KEPT, _EXACT, _FUZZY = 0, 1, 2
_DUPLICATE_REASONS = {_EXACT: "exact_duplicate", _FUZZY: "fuzzy_duplicate"}


@dataclass(frozen=True)
class _DedupDecisions:
    """Per phase-1 survivor, all shards in order: kept or which duplicate, and of which survivor."""

    status: np.ndarray  # int8: _KEPT, _EXACT or _FUZZY
    kept_position: np.ndarray  # the survivor kept in a duplicate's place (its own position if kept)
    rows: np.ndarray  # source row of each survivor
    shard_of: np.ndarray  # shard index of each survivor
    shard_start: np.ndarray  # position of each shard's first survivor

    def cluster_id(self, position: int) -> str:
        kept = int(self.kept_position[position])
        return _doc_id(int(self.shard_of[kept]), int(self.rows[kept]))


def _duplicates(config: CurateConfig, shard_dirs: list[Path]) -> _DedupDecisions:
    """Exact then fuzzy dedup over every phase-1 survivor, in shard order.

    Only fixed-width arrays are held: 16-byte exact keys and the signature matrix (the LSH
    index), filled shard by shard straight from Arrow buffers, with no per-document objects.
    """
    counts = [pq.ParquetFile(d / KEPT_FILE).metadata.num_rows for d in shard_dirs]
    total, num_hashes = sum(counts), config.fuzzy_dedup.num_hashes
    exact = np.empty(total, dtype="S16")
    signatures = np.empty((total, num_hashes), dtype=np.uint64) if config.fuzzy_dedup.enabled else None
    rows = np.empty(total, dtype=np.int64)
    offset = 0
    for count, shard_dir in zip(counts, shard_dirs):
        table = pq.read_table(shard_dir / KEPT_FILE, columns=[SOURCE_ROW, "exact_key", "signature"])
        rows[offset:offset + count] = table.column(SOURCE_ROW).to_numpy()
        exact[offset:offset + count] = table.column("exact_key").to_numpy(zero_copy_only=False)
        if signatures is not None and count:
            flat = table.column("signature").combine_chunks().flatten().to_numpy()
            signatures[offset:offset + count] = flat.reshape(count, num_hashes)
        offset += count
    status = np.zeros(total, dtype=np.int8)
    kept_position = np.arange(total, dtype=np.int64)
    if config.exact_dedup.enabled and total:
        _, first, inverse = np.unique(exact, return_index=True, return_inverse=True)
        first_of_key = first[inverse]  # np.unique's index is the first occurrence
        is_copy = first_of_key != kept_position
        status[is_copy], kept_position[is_copy] = _EXACT, first_of_key[is_copy]
    if signatures is not None and total:
        # Exact copies share their original's signature, so they join its cluster and the
        # cluster's smallest index is never a copy: clustering everything needs no filtered copy.
        roots = fuzzy_clusters(signatures, config.fuzzy_dedup)
        is_near = (roots != np.arange(total)) & (status == _KEPT)
        status[is_near], kept_position[is_near] = _FUZZY, roots[is_near]
    return _DedupDecisions(status, kept_position, rows, np.repeat(np.arange(len(shard_dirs)), counts),
                           np.cumsum([0, *counts[:-1]], dtype=np.int64))


def _passthrough_types(fields: tuple[str, ...], shard_dirs: list[Path]) -> FieldTypes:
    """One column type per passthrough field across every shard's kept and removed rows.

    Each shard infers its own (a shard with no value has type null, one with ints and one with
    floats differ), and datasets reads `data/*.parquet` as one table only if all agree.
    """
    schemas = [pq.read_schema(d / name) for d in shard_dirs for name in (KEPT_FILE, REMOVED_FILE)]
    types: FieldTypes = {}
    for field in fields:
        seen = [schema.field(field).type for schema in schemas]
        try:
            unified = pa.unify_schemas([pa.schema([(field, t)]) for t in seen], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            raise DataError(f"passthrough field {field!r} has different types in different records "
                            f"({sorted({str(t) for t in seen if t != pa.null()})}); give it one type") from None
        types[field] = unified.field(field).type
    return types


def _split_shard(decisions: _DedupDecisions, shard_index: int, shard_dir: Path,
                 fields: tuple[str, ...]) -> tuple[dict[str, list], dict[str, list]]:
    """A shard's rows after dedup: (kept columns, removed columns: phase 1's, then the duplicates)."""
    survivors = pq.read_table(shard_dir / KEPT_FILE, columns=["text", SOURCE_ROW, *fields]).to_pydict()
    removed = pq.read_table(shard_dir / REMOVED_FILE).to_pydict()
    removed["cluster_id"] = [None] * len(removed["text"])
    kept: dict[str, list] = {name: [] for name in ("text", SOURCE_ROW, "doc_id", *fields)}
    offset = int(decisions.shard_start[shard_index])
    for index, row in enumerate(survivors[SOURCE_ROW]):
        status = int(decisions.status[offset + index])
        if status == _KEPT:
            target, own = kept, {"doc_id": _doc_id(shard_index, row)}
        else:
            target, own = removed, {"reason": _DUPLICATE_REASONS[status], "matched_eval_ids": [], "detail": None,
                                    "cluster_id": decisions.cluster_id(offset + index)}
        for name in ("text", SOURCE_ROW, *fields):
            target[name].append(survivors[name][index])
        for name, value in own.items():
            target[name].append(value)
    return kept, removed


def _merge(config: CurateConfig, shard_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Exact then fuzzy dedup over all shards, in order; the first document of a cluster stays."""
    decisions = _duplicates(config, shard_dirs)
    types = _passthrough_types(config.passthrough_fields, shard_dirs)
    (out_dir / DATA_DIR).mkdir()
    (out_dir / REMOVED_DIR).mkdir()
    reasons: Counter[str] = Counter()
    removed_words: Counter[str] = Counter()
    per_shard = []
    for shard_index, shard_dir in enumerate(shard_dirs):
        kept, removed = _split_shard(decisions, shard_index, shard_dir, config.passthrough_fields)
        for reason, text in zip(removed["reason"], removed["text"]):
            reasons[reason] += 1
            removed_words[reason] += len(text.split())
        name = f"part-{shard_index:05d}.parquet"
        pq.write_table(pa.table({"text": pa.array(kept["text"], pa.string()),
                                 SOURCE_ROW: pa.array(kept[SOURCE_ROW], pa.int64()),
                                 "doc_id": pa.array(kept["doc_id"], pa.string()),
                                 **_passthrough_columns(kept, types, str(shard_dir))}), out_dir / DATA_DIR / name)
        pq.write_table(_removed_table(removed, types, str(shard_dir)), out_dir / REMOVED_DIR / name)
        per_shard.append({"shard": shard_index, "docs_out": len(kept["text"]),
                          "words_out": sum(len(t.split()) for t in kept["text"])})
    docs_out = sum(s["docs_out"] for s in per_shard)
    docs_in = docs_out + sum(reasons.values())
    if docs_in and not docs_out:
        raise DataError(f"every one of {docs_in} documents was removed ({dict(reasons)}); nothing to publish")
    return {"docs_in": docs_in, "docs_out": docs_out, "words_out": sum(s["words_out"] for s in per_shard),
            "removed": dict(sorted(reasons.items())), "removed_words": dict(sorted(removed_words.items())),
            "shards": per_shard}


def _write_stats(metrics: dict[str, Any], out_dir: Path) -> None:
    """Counts by rule and by shard: flat for DVC metrics, as rows for Prefect tables."""
    flat = {"docs_in": metrics["docs_in"], "docs_out": metrics["docs_out"], "words_out": metrics["words_out"],
            **{f"removed_{reason}": count for reason, count in metrics["removed"].items()}}
    (out_dir / METRICS_FILE).write_text(json.dumps(flat, indent=2) + "\n", encoding="utf-8")
    by_shard = [{"shard": s["shard"], "docs_in": s["docs_in"], "docs_kept_before_dedup": s["docs_kept"],
                 "docs_out": out["docs_out"], "words_in": s["words_in"], "words_kept_before_dedup": s["words_kept"],
                 "words_out": out["words_out"]}
                for s, out in zip(metrics["per_shard"], metrics["shards"])]
    by_reason = [{"reason": reason, "docs": count, "words": metrics["removed_words"][reason]}
                 for reason, count in metrics["removed"].items()]
    (out_dir / TABLES_FILE).write_text(json.dumps({"removed-by-reason": by_reason, "shards": by_shard}, indent=2)
                                       + "\n", encoding="utf-8")


def shard_location(dest: str, index: int, num_shards: int) -> str:
    return f"{dest.rstrip('/')}.shards/shard-{index:05d}-of-{num_shards:05d}"


def _uri(location: str | ArtifactRef) -> str:
    return location.uri if isinstance(location, ArtifactRef) else location


def shard_input_name(index: int) -> str:
    return f"shard_{index:05d}"


def plan_shards(config: CurateConfig, input: str | ArtifactRef, dest: str) -> list[tuple[ShardConfig, str]]:
    """The shard jobs for `input`: contiguous record ranges and where each is published."""
    total = count_records(materialize(input if isinstance(input, ArtifactRef) else input_ref(input)))
    if config.max_docs is not None:
        total = min(total, config.max_docs)
    if total == 0:
        raise DataError(f"{_uri(input)}: empty corpus (no records)")
    num_shards = min(config.num_shards, total)
    return [(ShardConfig(curate=config, index=i, num_shards=num_shards, total_records=total),
             shard_location(dest, i, num_shards)) for i in range(num_shards)]


def merge_shards(config: CurateConfig, dest: str, input: str | ArtifactRef,
                 decontaminate_against: str | ArtifactRef | None = None,
                 overwrite: bool = False, **shards: str | ArtifactRef) -> Manifest:
    """Phase 2: dedup across the published shards (`shard_00000=URI, ...`) into `dest`."""
    names = sorted(shards)
    inputs = {"input": input, **({"decontaminate_against": decontaminate_against} if decontaminate_against else {}),
              **{name: shards[name] for name in names}}

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        metrics = _merge(config, [paths[name] for name in names], out_dir)
        metrics["per_shard"] = [read_manifest(_uri(shards[name])).metrics for name in names]
        _write_stats(metrics, out_dir)
        return metrics

    return produce(SPEC, config, inputs, dest, build, overwrite=overwrite)


def curate(config: CurateConfig, input: str, dest: str, decontaminate_against: str | None = None,
           overwrite: bool = False, map_shards: MapShards = map) -> Manifest:
    """Curate the raw records at `input` into a dataset artifact at `dest`.

    Shard artifacts are published next to it (`DEST.shards/`); `map_shards(fn, jobs)` runs
    the shard jobs (sequentially by default; the Prefect flow fans them out itself).
    """
    # Resolve (hash) the raw inputs once, not once per shard and again at the merge.
    source = input_ref(input)
    evaluation = input_ref(decontaminate_against) if decontaminate_against else None

    def run(job: tuple[ShardConfig, str]) -> Manifest:
        return curate_shard(job[0], source, job[1], evaluation, overwrite=overwrite)

    shard_manifests = list(map_shards(run, plan_shards(config, source, dest)))
    shards = {shard_input_name(i): m.output for i, m in enumerate(shard_manifests)}
    return merge_shards(config, dest, source, evaluation, overwrite=overwrite, **shards)
