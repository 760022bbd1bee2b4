"""The curation component end to end on concrete inputs: reasons for every removal,
duplicates with their cluster, decontamination, formats, bad input, sharding and resume."""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.artifacts import directory_content_hash, read_manifest
from components.data.curate import CurateConfig, curate
from components.data.records import read_column
from components.errors import DataError
from flows.params import heldout_curation
from tests.conftest import REPO_ROOT, VENV_BIN

GSM8K_TRAIN = REPO_ROOT / "data/raw/gsm8k/train.jsonl"


def demo_curation(**updates) -> CurateConfig:
    """The repository's params.yaml curation (Gopher's alphabetic-word rule relaxed for math)."""
    from flows.params import load_params

    return load_params(REPO_ROOT / "params.yaml").curate.model_copy(update=updates)


def gsm8k_rows(count: int, offset: int = 0) -> list[dict]:
    lines = GSM8K_TRAIN.read_text(encoding="utf-8").splitlines()[offset:offset + count]
    return [json.loads(line) for line in lines]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def removed(dest: Path) -> list[dict]:
    return pa.concat_tables([pq.read_table(p) for p in sorted((dest / "removed").glob("*.parquet"))]).to_pylist()


def perturb(text: str, fraction: float, rng: random.Random) -> str:
    """Replace one run of about `fraction` of the words (a planted near duplicate whose
    shingle Jaccard stays near 0.85; scattered edits of 5% of words break up to 25% of the
    5-gram shingles)."""
    words = text.split(" ")
    span = max(1, int(len(words) * fraction))
    start = rng.randrange(len(words) - span)
    words[start:start + span] = ["zzz" + str(rng.randrange(10**6)) for _ in range(span)]
    return " ".join(words)


def test_normalisation_and_exact_dedup_record_their_reasons(tmp_path: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [
        {"question": "Cafe\u0301  costs?", "answer": "  4 \t dollars "},   # decomposed é, messy spaces
        {"question": "CAF\u00c9 costs?", "answer": "4 dollars"},           # same text once normalised and lowercased
        {"question": "Other", "answer": "5"},
    ])
    config = heldout_curation().model_copy(update={"exact_dedup": CurateConfig().exact_dedup})
    manifest = curate(config, str(raw), str(tmp_path / "out"))
    assert read_column(tmp_path / "out", "text") == ["Question: Caf\u00e9 costs?\nAnswer: 4 dollars", "Question: Other\nAnswer: 5"]
    assert read_column(tmp_path / "out", "source_line") == [1, 3]
    [dropped] = removed(tmp_path / "out")
    assert dropped["reason"] == "exact_duplicate" and dropped["source_row"] == 2
    assert dropped["cluster_id"] == read_column(tmp_path / "out", "doc_id")[0]
    assert manifest.metrics["removed"] == {"exact_duplicate": 1}
    assert manifest.metrics["docs_in"] == 3 and manifest.metrics["docs_out"] == 2


def test_quality_filters_fuzzy_dedup_pii_and_decontamination_on_real_documents(tmp_path: Path) -> None:
    rng = random.Random(0)
    rows = gsm8k_rows(60)
    from components.data.filters import english_word_tokenizer, run_filters

    tokenizer, filters = english_word_tokenizer(), demo_curation().filters
    originals = [i for i, r in enumerate(rows) if len((r["question"] + r["answer"]).split()) > 100
                 and run_filters(f"Question: {r['question']}\nAnswer: {r['answer']}", filters, tokenizer)[0]][:5]
    assert len(originals) == 5
    planted = [{"question": rows[i]["question"], "answer": perturb(rows[i]["answer"], 0.05, rng)} for i in originals]
    short = [{"question": "Too short.", "answer": "1"}]
    leaked = [next(r for r in gsm8k_rows(50, offset=100)  # also in the evaluation set below
                   if run_filters(f"Question: {r['question']}\nAnswer: {r['answer']}", filters, tokenizer)[0])]
    fresh = next(r for r in gsm8k_rows(50, offset=300)
                 if run_filters(f"Question: {r['question']}\nAnswer: {r['answer']}", filters, tokenizer)[0])
    with_email = [{"question": fresh["question"] + " Write to jane.doe@example.com for help.", "answer": fresh["answer"]}]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows + planted + short + leaked + with_email)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", leaked + gsm8k_rows(5, offset=200))
    manifest = curate(demo_curation(num_shards=3), str(raw), str(tmp_path / "out"), decontaminate_against=str(evaluation))

    by_row = {r["source_row"]: r for r in removed(tmp_path / "out")}
    doc_ids = dict(zip(read_column(tmp_path / "out", "source_line"), read_column(tmp_path / "out", "doc_id")))
    for k, i in enumerate(originals):  # planted near duplicates point at the original they copy
        near = by_row[61 + k]
        assert near["reason"] == "fuzzy_duplicate"
        assert near["cluster_id"] == doc_ids[i + 1], near
    assert by_row[66]["reason"] in {"gopher_short_doc", "top_2_gram"}  # repetition runs first, as in FineWeb
    assert by_row[67]["reason"] == "decontaminated" and by_row[67]["matched_eval_ids"] == ["eval.jsonl:1"]
    redacted = [t for t in read_column(tmp_path / "out", "text") if "Write to" in t]
    assert redacted and "<EMAIL_ADDRESS>" in redacted[0] and "jane.doe" not in redacted[0]
    metrics = manifest.metrics
    assert metrics["removed"]["fuzzy_duplicate"] == 5 and metrics["removed"]["decontaminated"] == 1
    assert [s["shard"] for s in metrics["per_shard"]] == [0, 1, 2]
    assert sum(s["pii_redacted"].get("emails", 0) for s in metrics["per_shard"]) >= 1
    assert metrics["docs_in"] == len(rows) + 8


@pytest.mark.parametrize("fmt", ["jsonl.gz", "parquet", "hf_dataset"])
def test_reads_every_input_format(tmp_path: Path, fmt: str) -> None:
    rows = gsm8k_rows(20)
    if fmt == "jsonl.gz":
        source = tmp_path / "raw.jsonl.gz"
        with gzip.open(source, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(r) + "\n" for r in rows)
    elif fmt == "parquet":
        source = tmp_path / "raw.parquet"
        pq.write_table(pa.Table.from_pylist(rows), source)
    else:
        from datasets import Dataset

        source = tmp_path / "raw_dataset"
        Dataset.from_list(rows).save_to_disk(str(source))
    manifest = curate(heldout_curation(), str(source), str(tmp_path / "out"))
    assert manifest.metrics["docs_out"] == 20
    assert read_column(tmp_path / "out", "text")[0].startswith("Question: " + rows[0]["question"][:20])


def test_output_loads_with_datasets(tmp_path: Path) -> None:
    from datasets import load_dataset

    curate(demo_curation(num_shards=2), str(write_jsonl(tmp_path / "raw.jsonl", gsm8k_rows(30))), str(tmp_path / "out"))
    kept = load_dataset("parquet", data_files=str(tmp_path / "out/data/*.parquet"), split="train")
    assert kept.column_names == ["text", "source_line", "doc_id"]
    gone = load_dataset("parquet", data_files=str(tmp_path / "out/removed/*.parquet"), split="train")
    assert "reason" in gone.column_names and "cluster_id" in gone.column_names


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"question": "q", "answer": "a"}\n{"question": \n', r"raw.jsonl:2: malformed JSON"),
    (b'{"question": "q"}\n', r"raw.jsonl:1: missing field 'answer'"),
    (b'[1, 2]\n', r"raw.jsonl:1: expected a JSON object, got list"),
    (b'{"question": "q\xff", "answer": "a"}\n', r"raw.jsonl:1: not valid UTF-8"),
    (b"\n\n", r"raw.jsonl: empty corpus"),
])
def test_bad_input_is_named_and_nothing_is_published(tmp_path: Path, content: bytes, expected: str) -> None:
    raw = tmp_path / "raw.jsonl"
    raw.write_bytes(content)
    with pytest.raises(DataError, match=expected):
        curate(CurateConfig(), str(raw), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_on_error_skip_counts_malformed_records(tmp_path: Path) -> None:
    good = json.dumps(gsm8k_rows(1)[0]).encode()
    (tmp_path / "raw.jsonl").write_bytes(good + b"\n{broken\n" + b'{"question": "q"}\n')
    config = heldout_curation().model_copy(update={"on_error": "skip"})
    manifest = curate(config, str(tmp_path / "raw.jsonl"), str(tmp_path / "out"))
    assert manifest.metrics["removed"] == {"malformed_record": 2}
    details = [r["detail"] for r in removed(tmp_path / "out")]
    assert "raw.jsonl:2: malformed JSON" in details[0] and "missing field 'answer'" in details[1]


def test_everything_removed_is_an_error(tmp_path: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match="every one of 3 documents was removed"):
        curate(CurateConfig(), str(raw), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_text_field_and_its_errors(tmp_path: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"body": "hello world"}, {"other": 1}])
    with pytest.raises(DataError, match=r"raw.jsonl:2: missing field 'body'"):
        curate(heldout_curation().model_copy(update={"text_field": "body"}), str(raw), str(tmp_path / "out"))


def _curate_cli(config_path: Path, source: Path, dest: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "crucible"), "curate", "--config", str(config_path), "--input", str(source),
                             "--output", str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_killed_run_resumes_from_published_shards_with_the_same_output(tmp_path: Path) -> None:
    from tests.conftest import write_params

    source = write_jsonl(tmp_path / "raw.jsonl", gsm8k_rows(1500))
    params = write_params(tmp_path / "params.yaml", str(tmp_path / "unused"), curate={"max_docs": None, "num_shards": 6})
    _curate_cli(params, source, tmp_path / "reference").wait(timeout=600)
    reference = read_manifest(str(tmp_path / "reference"))

    run = _curate_cli(params, source, tmp_path / "resumed")
    shards = tmp_path / "resumed.shards"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(shards.glob("*/manifest.json"))) < 2:
        time.sleep(0.05)
    os.kill(run.pid, signal.SIGKILL)  # a real crash mid-run
    run.wait()
    done_before = {p.parent.name: p.read_text() for p in shards.glob("*/manifest.json")}
    assert 2 <= len(done_before) < 6 and not (tmp_path / "resumed" / "manifest.json").exists()

    assert _curate_cli(params, source, tmp_path / "resumed").wait(timeout=600) == 0
    for name, text in done_before.items():  # published shards were not redone
        assert (shards / name / "manifest.json").read_text() == text
    resumed = read_manifest(str(tmp_path / "resumed"))
    assert resumed.output.content_hash == reference.output.content_hash
    assert directory_content_hash(tmp_path / "resumed") == directory_content_hash(tmp_path / "reference")
