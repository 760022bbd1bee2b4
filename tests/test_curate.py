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
from components.records import read_column
from components.errors import DataError
from flows.params import heldout_curation
from tests.conftest import REPO_ROOT, VENV_BIN, run_cli, write_params

GSM8K_TRAIN = REPO_ROOT / "data/raw/gsm8k/train.jsonl"
GSM8K_TEST = REPO_ROOT / "data/raw/gsm8k/test.jsonl"
GSM8K_TEMPLATE = "Question: {question}\nAnswer: {answer}"


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
    assert read_column(tmp_path / "out", "source_row") == [1, 3]
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
    doc_ids = dict(zip(read_column(tmp_path / "out", "source_row"), read_column(tmp_path / "out", "doc_id")))
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
    assert kept.column_names == ["text", "source_row", "doc_id"]
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


def passing_texts(rows: list[dict], count: int) -> list[str]:
    """Plain-text renderings ("{question}\n\n{answer}") of GSM8K rows that pass the demo filters."""
    from components.data.filters import english_word_tokenizer, run_filters

    tokenizer, filters = english_word_tokenizer(), demo_curation().filters
    texts = [f"{row['question']}\n\n{row['answer']}" for row in rows]
    return [text for text in texts if run_filters(text, filters, tokenizer)[0]][:count]


def own_text_corpus(tmp_path: Path) -> tuple[Path, str]:
    """A user's `{"id", "text"}` corpus of GSM8K-train texts, one of which (id "leak") pastes a
    GSM8K test problem into a post; returns the file and the problem's question."""
    leaked = json.loads(GSM8K_TEST.read_text(encoding="utf-8").splitlines()[0])
    texts = passing_texts(gsm8k_rows(40), 12)
    post = f"I was stuck on this one from class today.\n\n{leaked['question']}\n\n{leaked['answer']}"
    assert passing_texts([leaked], 1), "the leaked problem must pass the filters to reach decontamination"
    rows = [{"id": f"doc-{i}", "text": text} for i, text in enumerate(texts[:6])]
    rows += [{"id": "leak", "text": post}] + [{"id": f"doc-{i}", "text": text} for i, text in enumerate(texts[6:], 6)]
    return write_jsonl(tmp_path / "my_corpus.jsonl", rows), leaked["question"]


def test_text_corpus_is_decontaminated_against_question_answer_records(tmp_path: Path) -> None:
    corpus, question = own_text_corpus(tmp_path)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"question": "Unrelated?", "answer": "#### 1"},
                                                       {"question": question, "answer": "#### 18"}])
    shared_reading = demo_curation(text_field="text", num_shards=2)
    with pytest.raises(DataError, match=r"eval.jsonl:1: missing field 'text' .*set decontamination.text_field or "
                                        r"decontamination.text_template"):
        curate(shared_reading, str(corpus), str(tmp_path / "out"), decontaminate_against=str(evaluation))
    assert not (tmp_path / "out").exists()

    own = shared_reading.decontamination.model_copy(update={"text_template": GSM8K_TEMPLATE})
    manifest = curate(shared_reading.model_copy(update={"decontamination": own, "passthrough_fields": ("id",)}),
                      str(corpus), str(tmp_path / "out"), decontaminate_against=str(evaluation))
    [leak] = [row for row in removed(tmp_path / "out") if row["id"] == "leak"]
    assert leak["reason"] == "decontaminated" and leak["matched_eval_ids"] == ["eval.jsonl:2"]
    assert leak["source_row"] == 7
    assert manifest.metrics["removed"] == {"decontaminated": 1}
    assert read_column(tmp_path / "out", "id") == [f"doc-{i}" for i in range(12)]


def test_evaluation_records_read_from_their_own_field(tmp_path: Path) -> None:
    corpus, question = own_text_corpus(tmp_path)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"problem": question}])
    config = heldout_curation().model_copy(update={"text_field": "text", "passthrough_fields": ("id",)})
    own = config.decontamination.model_copy(update={"enabled": True, "text_field": "problem"})
    curate(config.model_copy(update={"decontamination": own}), str(corpus), str(tmp_path / "out"),
           decontaminate_against=str(evaluation))
    assert [(r["id"], r["reason"]) for r in removed(tmp_path / "out")] == [("leak", "decontaminated")]
    bad = write_jsonl(tmp_path / "bad_eval.jsonl", [{"problem": question}, {"question": question}])
    with pytest.raises(DataError, match=r"bad_eval.jsonl:2: missing field 'problem' \(record has \['question'\]\)$"):
        curate(config.model_copy(update={"decontamination": own}), str(corpus), str(tmp_path / "bad"),
               decontaminate_against=str(bad))


def test_decontamination_reads_the_evaluation_set_one_way_only() -> None:
    from components.data.decontaminate import DecontaminationConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="set text_field or text_template for the evaluation set, not both"):
        DecontaminationConfig(text_field="problem", text_template="{question}")


def users_params(path: Path, **curate_updates) -> Path:
    """The repository's params.yaml with the `curate` section edited, as a user would."""
    import yaml

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["curate"].update(curate_updates)
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def test_cli_curates_a_users_text_corpus_against_gsm8k_test(tmp_path: Path) -> None:
    """The user's path: `crucible curate --config` with `text_field: text`, their own corpus with
    a contaminated line, and the repository's GSM8K test set as the evaluation set."""
    corpus, _ = own_text_corpus(tmp_path)
    args = ("curate", "--input", str(corpus), "--decontaminate_against", str(GSM8K_TEST))
    shared = users_params(tmp_path / "shared.yaml", text_field="text", passthrough_fields=["id"])
    failed = run_cli(*args, "--config", str(shared), "--output", str(tmp_path / "shared"))
    assert failed.returncode != 0 and "test.jsonl:1: missing field 'text'" in failed.stderr
    assert "decontamination.text_template" in failed.stderr and not (tmp_path / "shared").exists()

    params = users_params(tmp_path / "params.yaml", text_field="text", passthrough_fields=["id"],
                          decontamination={"ngram_words": 13, "text_template": GSM8K_TEMPLATE})
    run_cli(*args, "--config", str(params), "--output", str(tmp_path / "out"), check=True)
    assert [(r["id"], r["reason"], r["matched_eval_ids"]) for r in removed(tmp_path / "out")] == [
        ("leak", "decontaminated", ["test.jsonl:1"])]
    assert read_column(tmp_path / "out", "id") == [f"doc-{i}" for i in range(12)]


def test_kept_and_removed_rows_name_their_input_row_and_carry_passthrough_fields(tmp_path: Path) -> None:
    rows = [{"id": "a", "url": "https://x/a", "n": 1, "question": "Cafe costs?", "answer": "4 dollars"},
            {"id": "b", "url": "https://x/b", "n": 2, "question": "CAFE costs?", "answer": "4 dollars"},
            {"id": "c", "url": None, "n": None, "question": "Other", "answer": "5"},
            {"id": "d", "url": None, "n": None, "question": "Third", "answer": "6"}]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows[:2])
    with open(raw, "a", encoding="utf-8") as handle:  # a blank line: rows count lines, as errors do
        handle.write("\n" + "".join(json.dumps(row) + "\n" for row in rows[2:]))
    config = heldout_curation().model_copy(update={"exact_dedup": CurateConfig().exact_dedup, "num_shards": 2,
                                                   "passthrough_fields": ("id", "url", "n")})
    curate(config, str(raw), str(tmp_path / "out"))
    parts = [pq.read_table(p) for p in sorted((tmp_path / "out/data").glob("*.parquet"))]
    assert [t.column_names for t in parts] == [["text", "source_row", "doc_id", "id", "url", "n"]] * 2
    # shard 1 saw only nulls in url and n: every part still has one type per field
    assert {(str(t.schema.field("url").type), str(t.schema.field("n").type)) for t in parts} == {("string", "int64")}
    kept = pa.concat_tables(parts).to_pylist()
    assert [(r["id"], r["source_row"], r["url"], r["n"]) for r in kept] == [
        ("a", 1, "https://x/a", 1), ("c", 4, None, None), ("d", 5, None, None)]
    [dropped] = removed(tmp_path / "out")
    assert (dropped["id"], dropped["source_row"], dropped["url"], dropped["n"]) == ("b", 2, "https://x/b", 2)
    assert dropped["reason"] == "exact_duplicate" and dropped["cluster_id"] == kept[0]["doc_id"]


def test_missing_passthrough_field_is_named_or_counted(tmp_path: Path) -> None:
    raw = write_jsonl(tmp_path / "raw.jsonl", [{"id": "a", "question": "q1", "answer": "a1"},
                                               {"question": "q2", "answer": "a2"}])
    config = heldout_curation().model_copy(update={"passthrough_fields": ("id",)})
    with pytest.raises(DataError, match=r"raw.jsonl:2: missing passthrough field\(s\) \['id'\]"):
        curate(config, str(raw), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    curate(config.model_copy(update={"on_error": "skip"}), str(raw), str(tmp_path / "out"))
    [skipped] = removed(tmp_path / "out")
    assert (skipped["reason"], skipped["source_row"], skipped["id"]) == ("malformed_record", 2, None)
    assert read_column(tmp_path / "out", "id") == ["a"]


@pytest.mark.parametrize(("values", "num_shards", "expected"), [
    ([1, "two"], 2, r"passthrough field 'n' has different types in different records \(\['int64', 'string'\]\)"),
    ([1, "two"], 1, r"raw.jsonl \(shard 0\): passthrough field 'n' cannot be one parquet column"),
])
def test_passthrough_field_of_mixed_types_is_refused(tmp_path: Path, values: list, num_shards: int,
                                                     expected: str) -> None:
    rows = [{"n": n, "question": f"q{i}", "answer": "a"} for i, n in enumerate(values)]
    raw = write_jsonl(tmp_path / "raw.jsonl", rows)
    config = heldout_curation().model_copy(update={"passthrough_fields": ("n",), "num_shards": num_shards})
    with pytest.raises(DataError, match=expected):
        curate(config, str(raw), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_passthrough_field_cannot_overwrite_curates_own_columns() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"\['source_row'\] would overwrite curate's own columns"):
        CurateConfig(passthrough_fields=["id", "source_row"])
    with pytest.raises(ValidationError, match=r"\['id'\] listed more than once"):
        CurateConfig(passthrough_fields=["id", "id"])


def _curate_cli(config_path: Path, source: Path, dest: Path) -> subprocess.Popen:
    return subprocess.Popen([str(VENV_BIN / "crucible"), "curate", "--config", str(config_path), "--input", str(source),
                             "--decontaminate_against", str(REPO_ROOT / "data/raw/gsm8k/test.jsonl"),
                             "--output", str(dest)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.mark.slow
def test_killed_run_resumes_from_published_shards_with_the_same_output(tmp_path: Path) -> None:
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
