"""The `crucible` CLI as a user runs it: help, stages, lineage, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.stages import STAGES
from tests.conftest import REPO_ROOT, run_cli, write_params


@pytest.mark.parametrize("command", ["run", "lineage", *[s.name for s in STAGES]])
def test_every_command_has_help(command: str) -> None:
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: crucible" in result.stdout


def test_top_level_help_lists_commands() -> None:
    out = run_cli("--help").stdout
    for command in ["run", "lineage", "curate", "pretrain", "evaluate", "report"]:
        assert command in out


def test_stages_chain_from_the_cli_and_lineage_reaches_raw_data(tiny_params: Path, tmp_path: Path) -> None:
    for stage in STAGES:
        run_cli(stage.name, "--config", str(tiny_params), check=True)
    metrics = json.loads((tmp_path / "artifacts/report/metrics.json").read_text())
    assert metrics["heldout_perplexity"] > 0
    lineage = run_cli("lineage", str(tmp_path / "artifacts/report"), check=True).stdout
    assert lineage.splitlines()[0].startswith(str(tmp_path / "artifacts/report"))
    assert "[pretrain v2]" in lineage and "[tokenizer v1]" in lineage
    sft_lineage = run_cli("lineage", str(tmp_path / "artifacts/sft"), check=True).stdout
    assert "[sft_data v1]" in sft_lineage and "[pretrain v2]" in sft_lineage and "[curate v3]" in sft_lineage
    assert (tmp_path / "artifacts/sft/model.safetensors").is_file()
    assert "| text | 2 |" in (tmp_path / "artifacts/prompt_tuning/report.md").read_text()
    printed = run_cli("report", str(tmp_path / "artifacts/evaluate_sft"), check=True).stdout
    assert "# Verifiable accuracy: 2 of 1319 problems from `test.jsonl` (capped by max_problems=2)" in printed
    assert "| pass@2 |" in printed
    assert "## Lineage of the evaluated model" in printed and "[sft v1]" in printed and "[pretrain v2]" in printed
    assert "Accuracy vs compute" in (tmp_path / "artifacts/compare_test_time_compute/report.md").read_text()
    assert "data/raw/gsm8k/train.jsonl  [raw]" in lineage and "data/raw/gsm8k/test.jsonl  [raw]" in lineage
    # unchanged re-run of a stage is a no-op; explicit input/output override the layout
    again = run_cli("curate", "--config", str(tiny_params), check=True).stdout
    assert again.startswith(f"curate: {tmp_path}/artifacts/curate sha256:")
    other = tmp_path / "elsewhere"
    run_cli("curate_heldout", "--config", str(tiny_params), "--input", str(REPO_ROOT / "data/raw/gsm8k/test.jsonl"),
            "--output", str(other), check=True)
    assert (other / "manifest.json").is_file()


def _fails_with(args: list[str], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crucible: error: ") and expected in lines[0], result.stderr


def test_unknown_key_fails_before_work(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("pretrain:\n  train:\n    optim:\n      learning_rat: 0.1\n")
    _fails_with(["curate", "--config", str(bad)], "bad.yaml: pretrain.train.optim.learning_rat: Extra inputs are not permitted")
    _fails_with(["run", "pipeline", "--config", str(bad)], "bad.yaml: pretrain.train.optim.learning_rat")
    assert not (tmp_path / "artifacts").exists()


def test_missing_raw_file(tmp_path: Path) -> None:
    params = write_params(tmp_path / "p.yaml", str(tmp_path / "artifacts"), data={"raw_train": str(tmp_path / "no.jsonl")})
    _fails_with(["curate", "--config", str(params)], "no.jsonl: input not found")
    assert not (tmp_path / "artifacts").exists()


def test_manifestless_input_and_occupied_output(tiny_params: Path, tmp_path: Path) -> None:
    half = tmp_path / "artifacts" / "curate"
    half.mkdir(parents=True)
    (half / "data").mkdir()
    _fails_with(["tokenizer", "--config", str(tiny_params)], "curate: not a complete artifact (no manifest.json)")
    (half / "data").rmdir()
    half.rmdir()
    run_cli("curate", "--config", str(tiny_params), check=True)
    before = (tmp_path / "artifacts/curate/manifest.json").read_text()
    changed = write_params(tmp_path / "changed.yaml", str(tmp_path / "artifacts"), curate={"max_docs": 50})
    _fails_with(["curate", "--config", str(changed)], "already holds a different artifact")
    assert (tmp_path / "artifacts/curate/manifest.json").read_text() == before
    run_cli("curate", "--config", str(changed), "--overwrite", check=True)
    assert json.loads((tmp_path / "artifacts/curate/manifest.json").read_text())["metrics"]["docs_in"] == 50
