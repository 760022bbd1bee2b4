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
        if stage.dvc_file == "dvc.yaml":  # the demo's chain (the real-model chain: tests/test_real_flow.py)
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
    _fails_with(["arithmetic_task", "--config", str(tiny_params), "--output", str(tmp_path / "artifacts/curate")],
                "already holds a different artifact (curate v")  # another component's artifact
    assert (tmp_path / "artifacts/curate/manifest.json").read_text() == before
    changed = write_params(tmp_path / "changed.yaml", str(tmp_path / "artifacts"), curate={"max_docs": 50})
    run_cli("curate", "--config", str(changed), check=True)  # a rerun of the stage with new params, as dvc repro
    assert json.loads((tmp_path / "artifacts/curate/manifest.json").read_text())["metrics"]["docs_in"] == 50


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_both_drivers_follow_one_overwrite_policy(prefect_api, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Issue 14 cases 8 and 11: `crucible STAGE` and `crucible run STAGE` (a Prefect stage flow)
    replace the stage's own previous artifact, refuse another component's without --overwrite,
    and never delete a folder that is not an artifact (the user's own files)."""
    from flows.cli import main
    from flows.pipeline import STAGE_FLOWS

    params = write_params(tmp_path / "p.yaml", str(tmp_path / "artifacts"))
    dest = tmp_path / "artifacts" / "arithmetic_task"
    dest.mkdir(parents=True)
    (dest / "my_data.jsonl").write_text('{"text": "mine"}\n')
    (dest / "NOTES.txt").write_text("notes")
    before = _tree(tmp_path)
    assert main(["arithmetic_task", "--config", str(params), "--overwrite"]) == 1
    assert "arithmetic_task: exists and is not an artifact (no manifest.json; it holds NOTES.txt, my_data.jsonl)" \
        in capsys.readouterr().err
    with pytest.raises(Exception, match="exists and is not an artifact"):
        STAGE_FLOWS["arithmetic_task"](params_file=str(params))
    assert _tree(tmp_path) == before

    for name in ("my_data.jsonl", "NOTES.txt"):
        (dest / name).unlink()
    dest.rmdir()
    assert main(["curate_heldout", "--config", str(params), "--output", str(dest)]) == 0
    assert main(["arithmetic_task", "--config", str(params)]) == 1
    assert "already holds a different artifact (curate v" in capsys.readouterr().err
    with pytest.raises(Exception, match="already holds a different artifact"):
        STAGE_FLOWS["arithmetic_task"](params_file=str(params))
    assert main(["arithmetic_task", "--config", str(params), "--overwrite"]) == 0

    changed = write_params(tmp_path / "changed.yaml", str(tmp_path / "artifacts"),
                           arithmetic_task={"train_problems": 30})
    assert not STAGE_FLOWS["arithmetic_task"](params_file=str(changed))["cached"]  # own artifact: replaced
    assert json.loads((dest / "manifest.json").read_text())["config"]["train_problems"] == 30
    assert main(["arithmetic_task", "--config", str(params)]) == 0  # and back, from the CLI
    assert json.loads((dest / "manifest.json").read_text())["config"]["train_problems"] == 40


# Curation filters for a user's short GSM8K-style rows (Gopher's 50-word minimum drops every one).
OWN_DATA_FILTERS = {"filters": {"gopher_quality": {"min_doc_words": 10, "max_non_alpha_words_ratio": 0.4},
                                "gopher_repetition": {"enabled": False}}}


def _own_problems(count: int) -> list[dict[str, str]]:
    """GSM8K-style rows with varied wording (curation's repetition filters drop templated text)."""
    names = ["Ada", "Bruno", "Chloe", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lior"]
    things = ["apples", "marbles", "stamps", "pencils", "shells", "tickets", "cookies", "beads", "cards", "coins"]
    return [{"question": f"{names[i % 12]} collects {things[i % 10]}. On Monday {names[i % 12]} found {i + 3} of them, "
                         f"and then the neighbour gave {i + 2} more to the family. "
                         f"How many {things[i % 10]} are there now?",
             "answer": f"{names[i % 12]} has {i + 3} + {i + 2} = <<{i + 3}+{i + 2}={2 * i + 5}>>{2 * i + 5} "
                       f"{things[i % 10]}.\n#### {2 * i + 5}"} for i in range(count)]


def test_naming_one_input_requires_the_others_or_layout_defaults(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The rule of issue 14: a named input never silently pairs with the layout's (the demo's) files."""
    from flows.cli import main

    params = write_params(tmp_path / "p.yaml", str(tmp_path / "artifacts"), curate=OWN_DATA_FILTERS)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps(row) + "\n" for row in _own_problems(8)))
    assert main(["curate", "--config", str(params), "--input", str(mine)]) == 1
    err = capsys.readouterr().err
    assert "--decontaminate_against (the layout has " in err and "data/raw/gsm8k/test.jsonl" in err
    for stage, named, missing in [("grpo", "--problems", "--heldout"), ("ppo", "--problems", "--heldout"),
                                  ("prompt_tuning", "--dataset", "--heldout"), ("evaluate", "--model", "--blocks")]:
        assert main([stage, "--config", str(params), named, str(mine)]) == 1
        assert f"{missing} (the layout has" in capsys.readouterr().err, stage
    assert not (tmp_path / "artifacts").exists()
    assert main(["curate", "--config", str(params), "--input", str(mine), "--layout-defaults"]) == 0
    manifest = json.loads((tmp_path / "artifacts/curate/manifest.json").read_text())
    assert manifest["input_origins"] == {"input": "given", "decontaminate_against": "default"}
    lineage = run_cli("lineage", str(tmp_path / "artifacts/curate"), check=True).stdout
    assert "mine.jsonl  [raw]" in lineage and "unchanged  (given)" in lineage and "unchanged  (default)" in lineage
