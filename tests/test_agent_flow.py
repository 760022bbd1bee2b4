"""The `agents` flow end to end on a user's own model and GSM8K files, and `crucible agent run`.

The agents demo runs SmolLM2-135M-Instruct (`make agents-demo`); this test runs the same flow
on a tiny Llama directory the user imported and GSM8K-format files the user wrote, so it checks
the wiring, caching and provenance, and that nothing falls back to the repository's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.artifacts import read_manifest
from components.models.precision import this_cpu_bf16_units
from flows.params import load_params
from flows.stages import members
from tests.conftest import TINY_PARAMS, build_tiny_lm, run_cli

pytestmark = pytest.mark.slow
LIMITS = {"max_turns": 2, "max_new_tokens_per_turn": 8, "max_episode_tokens": 2048, "max_wall_seconds": 300}
ARITHMETIC = {"name": "arithmetic", "arithmetic": {"digits": 2, "min_steps": 1, "max_steps": 1}}
EVALUATION = {"tasks": 3, "trials": 2, "limits": LIMITS, "batch_tasks": 3, "reflection_max_new_tokens": 8}
GRPO_BASE = {"env": ARITHMETIC, "group_size": 2, "limits": LIMITS, "dynamic_sampling": False,
             "train": {"precision": "fp32", "max_steps": 1, "batch_size_rows": 2, "checkpoint_every_steps": 0,
                       "optim": {"warmup_steps": 0}}, "heldout": {"problems": 2, "samples": 0}}


def _user_gsm8k(directory: Path) -> Path:
    directory.mkdir()
    for split, count in (("train", 12), ("test", 6)):
        rows = [{"question": f"{split} {i}: Ana has {i} figs and gets {i + 3} more. How many figs?",
                 "answer": f"{i} + {i + 3} = <<{i}+{i + 3}={2 * i + 3}>>{2 * i + 3}\n#### {2 * i + 3}"} for i in range(count)]
        (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return directory


def _params(tmp_path: Path, model: Path) -> Path:
    gsm8k = {"name": "gsm8k", "gsm8k_dir": str(_user_gsm8k(tmp_path / "my_gsm8k")), "gsm8k_validation_problems": 2}
    lookup = {"name": "lookup", "knowledge_base": {"entities": 40}}
    params = {**TINY_PARAMS, "artifacts_root": str(tmp_path / "artifacts"), "data": {"real_model": str(model)},
              "agent_traces": {"examples_per_env": 4, "envs": [ARITHMETIC, lookup, gsm8k]},
              "agent_sft_data": {"format": "messages", "seq_len_tokens": 2048},
              "agent_sft": {"train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 2,
                                      "checkpoint_every_steps": 0, "optim": {"warmup_steps": 0}}},
              "agent_grpo": {"seeds": [0], "base": GRPO_BASE},
              "agent_grpo_no_tools": {"seeds": [0], "base": {**GRPO_BASE, "env": {**ARITHMETIC, "tools": []}}},
              "evaluate_agent_arithmetic": {**EVALUATION, "env": ARITHMETIC},
              "evaluate_agent_lookup": {**EVALUATION, "env": lookup},
              "evaluate_agent_gsm8k": {**EVALUATION, "env": gsm8k},
              "evaluate_agent_rl": {**EVALUATION, "env": ARITHMETIC, "methods": ["tools"]},
              "evaluate_agent_rl_no_tools": {**EVALUATION, "env": ARITHMETIC, "methods": ["no_tools"]},
              "compare_agent_compute": {"query_volumes": [10, 1000]}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def test_agents_flow_runs_on_the_users_model_and_files(prefect_api, tmp_path: Path) -> None:
    from flows.pipeline import agents
    from flows.stages import STAGES_BY_NAME, run_stage

    model = build_tiny_lm(tmp_path / "mine", max_positions=2048)
    params = load_params(_params(tmp_path, model))
    run_stage(STAGES_BY_NAME["import_model"], params)  # the agents chain starts from an imported model
    first = agents(params=params)
    assert list(first) == [stage.name for stage in members("agents")] and not any(i["cached"] for i in first.values())

    root = tmp_path / "artifacts"
    traces = [json.loads(line) for line in (root / "agent_traces/train.jsonl").read_text().splitlines()]
    sources = [json.loads(line) for line in (root / "agent_traces/sources.jsonl").read_text().splitlines()]
    gsm8k_questions = [t["messages"][1]["content"] for t, s in zip(traces, sources) if s["env"] == "gsm8k"]
    assert gsm8k_questions and all(q.startswith("train ") for q in gsm8k_questions)  # the user's file, train rows only
    assert read_manifest(str(root / "agent_sft")).inputs["model"].uri == str(root / "import_model")
    for name in ("evaluate_agent_sft_gsm8k", "evaluate_agent_base_gsm8k"):
        transcripts = [json.loads(line) for line in (root / name / "transcripts.jsonl").read_text().splitlines()]
        assert transcripts and all(t["trajectory"]["seed"] >= 2_000_000 for t in transcripts)  # test seeds only
    study = read_manifest(str(root / "agent_grpo"))
    assert study.metrics["seeds"] == 1 and (root / "agent_grpo.seeds/seed0/model.safetensors").is_file()
    no_tools = read_manifest(str(root / "agent_grpo_no_tools.seeds/seed0"))
    assert no_tools.metrics["tools"] == [] and read_manifest(str(root / "agent_grpo.seeds/seed0")).metrics["tools"] == [
        "calculator"]
    assert (root / "compare_agent_compute/report.md").is_file()

    again = agents(params=params)
    assert all(info["cached"] for info in again.values())  # an unchanged rerun does no work


def test_agent_run_prints_the_transcript(tmp_path: Path) -> None:
    model = build_tiny_lm(tmp_path / "mine", max_positions=2048)
    result = run_cli("agent", "run", "--env", "arithmetic", "--model", str(model), "--trials", "2",
                     "--max-turns", "2", "--max-new-tokens", "6", "--transcript", str(tmp_path / "t.jsonl"),
                     "--precision", "auto")
    assert result.returncode == 0, result.stderr[-2000:]
    resolved = "bf16" if this_cpu_bf16_units() else "fp32"  # `auto`, by this machine's /proc/cpuinfo
    assert result.stdout.startswith(f"precision: {resolved} (auto: cpu has ")
    assert "=== trial 1: arithmetic seed 2000000" in result.stdout and "Compute" in result.stdout
    assert "[assistant]" in result.stdout and "calculator" in result.stdout
    trials = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert 1 <= len(trials) <= 2 and all(t["seed"] == 2_000_000 for t in trials)
    assert result.stdout.count("=== trial") == len(trials)

    missing = run_cli("agent", "run", "--env", "arithmetic", "--model", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "nothing" in missing.stderr and "not a model directory" in missing.stderr
