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
decontamination), so a user can see why any document went.
"""

from __future__ import annotations

import re
import unicodedata
import json
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from components.artifacts import (
    ArtifactRef, ComponentSpec, Manifest, input_ref, materialize, produce, read_manifest,
)
from components.config import StrictConfig
from components.data.decontaminate import DecontaminationConfig, NgramIndex
from components.data.dedup import (
    ExactDedupConfig, FuzzyDedupConfig, exact_key, fuzzy_clusters, make_permutations, minhash_signature,
)
from components.data.filters import FiltersConfig, english_word_tokenizer, run_filters
from components.data.pii import PIIConfig, redact_pii
from components.data.records import DATA_DIR, count_records, format_record, iter_records
from components.errors import DataError

SPEC = ComponentSpec(name="curate", version="2")
SHARD_SPEC = ComponentSpec(name="curate_shard", version="2")
REMOVED_DIR = "removed"
KEPT_FILE = "kept.parquet"
REMOVED_FILE = "removed.parquet"
METRICS_FILE = "metrics.json"  # flat counts, declared as DVC metrics
TABLES_FILE = "tables.json"  # per-reason and per-shard rows, published as Prefect tables

_HORIZONTAL_SPACE = re.compile(r"[ \t\f\v\u00a0]+")
T = TypeVar("T")
R = TypeVar("R")
MapShards = Callable[[Callable[[T], R], list[T]], Iterable[R]]


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


def _record_text(config: CurateConfig, record: dict[str, Any], where: str) -> str:
    if config.text_field is None:
        return format_record(config.text_template, record, where)
    if config.text_field not in record:
        raise DataError(f"{where}: missing field {config.text_field!r} (record has {sorted(record)})")
    value = record[config.text_field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {config.text_field!r} is {type(value).__name__}, expected a string")
    return value


def _eval_index(config: CurateConfig, eval_path: Path | None) -> NgramIndex | None:
    if eval_path is None or not config.decontamination.enabled:
        return None
    texts, ids = [], []
    for row, record in iter_records(eval_path):
        if isinstance(record, DataError):
            raise record
        texts.append(normalize_text(_record_text(config, record, f"{eval_path}:{row}"), config.normalize))
        ids.append(f"{eval_path.name}:{row}")
    return NgramIndex.from_texts(texts, ids, config.decontamination.ngram_words)


def _matching_text(text: str, config: NormalizeConfig) -> str:
    return text.lower() if config.lowercase_for_matching else text


def _build_shard(shard: ShardConfig, source: Path, eval_path: Path | None, out_dir: Path) -> dict[str, Any]:
    config = shard.curate
    start, stop = shard.row_range
    tokenizer = english_word_tokenizer()
    eval_index = _eval_index(config, eval_path)
    permutations = make_permutations(config.fuzzy_dedup)
    kept: dict[str, list] = {"text": [], "source_row": [], "exact_key": [], "signature": []}
    removed: dict[str, list] = {"text": [], "source_row": [], "reason": [], "matched_eval_ids": [], "detail": []}
    reasons: Counter[str] = Counter()
    removed_words: Counter[str] = Counter()
    pii_counts: Counter[str] = Counter()
    words_in = words_out = 0

    def drop(text: str, row: int, reason: str, matched: list[str] | None = None, detail: str | None = None) -> None:
        reasons[reason] += 1
        removed_words[reason] += len(text.split())
        removed["text"].append(text)
        removed["source_row"].append(row)
        removed["reason"].append(reason)
        removed["matched_eval_ids"].append(matched or [])
        removed["detail"].append(detail)

    for row, record in iter_records(source, start, stop):
        try:
            if isinstance(record, DataError):
                raise record
            raw_text = _record_text(config, record, f"{source}:{row}")
        except DataError as error:
            if config.on_error == "fail":
                raise
            drop("", row, "malformed_record", detail=str(error))
            continue
        text = normalize_text(raw_text, config.normalize)
        words_in += len(text.split())
        if len(text) < config.min_chars:
            drop(text, row, "too_short")
            continue
        filtered, reason = run_filters(text, config.filters, tokenizer)
        if filtered is None:
            drop(text, row, reason or "filtered")
            continue
        text = filtered
        # Decontaminate before redaction, so a placeholder cannot break a 13-gram match.
        if eval_index is not None and (matched := eval_index.matches(text)):
            drop(text, row, "decontaminated", matched)
            continue
        if config.pii.enabled:
            text, counts = redact_pii(text, config.pii)
            pii_counts.update(counts)
        matching = _matching_text(text, config.normalize)
        kept["text"].append(text)
        kept["source_row"].append(row)
        kept["exact_key"].append(exact_key(matching))
        kept["signature"].append(minhash_signature(matching, config.fuzzy_dedup, permutations))
        words_out += len(text.split())

    pq.write_table(pa.table({
        "text": pa.array(kept["text"], pa.string()),
        "source_row": pa.array(kept["source_row"], pa.int64()),
        "exact_key": pa.array(kept["exact_key"], pa.binary()),
        "signature": _signature_column(kept["signature"], config.fuzzy_dedup.num_hashes),
    }), out_dir / KEPT_FILE)
    pq.write_table(_removed_table(removed), out_dir / REMOVED_FILE)
    return {
        "shard": shard.index, "rows": [start, stop], "docs_in": stop - start, "docs_kept": len(kept["text"]),
        "words_in": words_in, "words_kept": words_out, "removed": dict(sorted(reasons.items())),
        "removed_words": dict(sorted(removed_words.items())),
        "pii_redacted": dict(sorted(pii_counts.items())),
    }


def _signature_column(signatures: list[np.ndarray], num_hashes: int) -> pa.FixedSizeListArray:
    flat = np.concatenate(signatures) if signatures else np.empty(0, dtype=np.uint64)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint64()), num_hashes)


def _removed_table(removed: dict[str, list]) -> pa.Table:
    return pa.table({
        "text": pa.array(removed["text"], pa.string()),
        "source_row": pa.array(removed["source_row"], pa.int64()),
        "reason": pa.array(removed["reason"], pa.string()),
        "cluster_id": pa.array(removed.get("cluster_id", [None] * len(removed["text"])), pa.string()),
        "matched_eval_ids": pa.array(removed["matched_eval_ids"], pa.list_(pa.string())),
        "detail": pa.array(removed["detail"], pa.string()),
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


def _duplicates(config: CurateConfig, shard_dirs: list[Path]) -> tuple[np.ndarray, ...]:
    """(status, kept_position, source_rows, shard_index) over every phase-1 survivor in shard order.

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
        table = pq.read_table(shard_dir / KEPT_FILE, columns=["source_row", "exact_key", "signature"])
        rows[offset:offset + count] = table.column("source_row").to_numpy()
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
    return status, kept_position, rows, np.repeat(np.arange(len(shard_dirs)), counts)


def _merge(config: CurateConfig, shard_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Exact then fuzzy dedup over all shards, in order; the first document of a cluster stays."""
    status, kept_position, rows_all, shard_of = _duplicates(config, shard_dirs)
    (out_dir / DATA_DIR).mkdir()
    (out_dir / REMOVED_DIR).mkdir()
    reasons: Counter[str] = Counter()
    removed_words: Counter[str] = Counter()
    per_shard = []
    position = 0
    for shard_index, shard_dir in enumerate(shard_dirs):
        kept_table = pq.read_table(shard_dir / KEPT_FILE, columns=["text", "source_row"])
        removed = pq.read_table(shard_dir / REMOVED_FILE).to_pydict()
        removed["cluster_id"] = [None] * len(removed["text"])
        reasons.update(removed["reason"])
        for reason, text in zip(removed["reason"], removed["text"]):
            removed_words[reason] += len(text.split())
        texts, rows, doc_ids = [], [], []
        for text, row in zip(kept_table.column("text").to_pylist(), kept_table.column("source_row").to_pylist()):
            if status[position] != _KEPT:
                reason = _DUPLICATE_REASONS[int(status[position])]
                kept = int(kept_position[position])
                cluster = _doc_id(int(shard_of[kept]), int(rows_all[kept]))
                reasons[reason] += 1
                removed_words[reason] += len(text.split())
                for column, value in (("text", text), ("source_row", row), ("reason", reason),
                                      ("cluster_id", cluster), ("matched_eval_ids", []), ("detail", None)):
                    removed[column].append(value)
            else:
                texts.append(text)
                rows.append(row)
                doc_ids.append(_doc_id(shard_index, row))
            position += 1
        name = f"part-{shard_index:05d}.parquet"
        pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "source_line": pa.array(rows, pa.int64()),
                                 "doc_id": pa.array(doc_ids, pa.string())}), out_dir / DATA_DIR / name)
        pq.write_table(_removed_table(removed), out_dir / REMOVED_DIR / name)
        per_shard.append({"shard": shard_index, "docs_out": len(texts), "words_out": sum(len(t.split()) for t in texts)})
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
