"""The benchmark splits of the real-model pipeline: disjoint, seeded, rows kept as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.errors import DataError
from components.tasks.splits import ProblemSplitsConfig, problem_splits


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _problems(prefix: str, count: int) -> list[dict]:
    return [{"question": f"{prefix} {i}?", "answer": f"work\n#### {i}", "extra": i} for i in range(count)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_splits_are_disjoint_seeded_and_keep_every_field(tmp_path: Path) -> None:
    train, test = _write(tmp_path / "train.jsonl", _problems("t", 30)), _write(tmp_path / "test.jsonl", _problems("x", 12))
    config = ProblemSplitsConfig(validation_problems=8, test_problems=5, seed=1)
    manifest = problem_splits(config, str(train), str(test), str(tmp_path / "out"))
    out = {name: _rows(tmp_path / "out" / f"{name}.jsonl") for name in ("train", "validation", "test")}
    assert [len(out[n]) for n in ("train", "validation", "test")] == [22, 8, 5]
    assert manifest.metrics == {"train_problems": 22, "validation_problems": 8, "test_problems": 5}
    assert sorted(out["train"] + out["validation"], key=lambda r: r["extra"]) == _problems("t", 30)
    assert all(row in _problems("x", 12) for row in out["test"])
    assert out["validation"] == sorted(out["validation"], key=lambda r: r["extra"])  # file order kept
    again = problem_splits(config.model_copy(update={"seed": 2}), str(train), str(test), str(tmp_path / "other"))
    assert again.output.content_hash != manifest.output.content_hash  # the seed draws another sample


def test_a_bad_row_or_too_few_rows_is_named_and_nothing_is_written(tmp_path: Path) -> None:
    rows = _problems("t", 10)
    rows[6]["answer"] = "no marker"
    train, test = _write(tmp_path / "train.jsonl", rows), _write(tmp_path / "test.jsonl", _problems("x", 3))
    with pytest.raises(DataError, match=r"train.jsonl:7: .*'####'"):
        problem_splits(ProblemSplitsConfig(validation_problems=2, test_problems=2), str(train), str(test),
                       str(tmp_path / "out"))
    good = _write(tmp_path / "good.jsonl", _problems("t", 10))
    with pytest.raises(DataError, match=r"test.jsonl: asked for 5 problems, the file has 3"):
        problem_splits(ProblemSplitsConfig(validation_problems=2, test_problems=5), str(good), str(test),
                       str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
