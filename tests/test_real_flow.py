"""The `real` flow end to end on a user's own files: their model directory and their problems.

The real demo runs SmolLM2-135M-Instruct (`make real-demo`, about an hour here); this test runs
the same flow and stages on a tiny Llama model directory and a small GSM8K-format file the
user wrote, so it checks the wiring, caching and provenance, and that nothing falls back to
the demo's files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from components.artifacts import directory_content_hash, read_manifest
from flows.params import load_params
from flows.stages import members
from tests.conftest import TINY_PARAMS

pytestmark = pytest.mark.slow
GREEDY = {"max_problems": 6, "samples_per_problem": 0, "ks": [], "ns": [], "max_new_tokens": 12, "tool_use": False,
          "reflection_rounds": 0, "sampler": "decode", "batch_prompts": 6}
TINY_REAL = {
    "real_splits": {"validation_problems": 8, "test_problems": 6},
    "real_arithmetic_task": {"train_problems": 40, "validation_problems": 6, "test_problems": 6, "max_steps": 1,
                             "max_operand": 9, "operations": ["+"]},
    "real_evaluate_gsm8k": GREEDY, "real_evaluate_arithmetic": GREEDY,
    "real_evaluate_pools": {**GREEDY, "max_problems": 4, "samples_per_problem": 2, "ks": [1, 2], "ns": [1, 2]},
    "real_sft_data": {"seq_len_tokens": 256}, "real_heldout_data": {"seq_len_tokens": 256, "packing": False},
    # enough SFT that the tiny model writes `#### N` lines, so GRPO's rewards vary within a group
    "real_sft": {"train": {"batch_size_rows": 4, "max_steps": 30, "checkpoint_every_steps": 0,
                           "optim": {"learning_rate": 1e-2, "warmup_steps": 2}}, "lora": {"r": 8}},
    "real_grpo_study": {"seeds": [0, 1], "base": {
        "train": {"batch_size_rows": 2, "max_steps": 2, "optim": {"warmup_steps": 0}}, "group_size": 2,
        "max_new_tokens": 24, "heldout": {"problems": 4, "samples": 1},
        "rewards": [{"function": "format"}, {"function": "correctness"}]}},
    "real_preference_pairs": {"max_problems": 8, "samples_per_prompt": 2, "max_new_tokens": 8,
                              "reference_when_all_wrong": True},
    "real_dpo": {"heldout_fraction": 0.25, "train": {"batch_size_rows": 2, "max_steps": 2, "optim": {"warmup_steps": 1}}},
}


def _user_problems(path: Path, prefix: str, count: int) -> str:
    rows = [{"question": f"{prefix}: Mia has {i} pens and buys {i + 2} more. How many pens now?",
             "answer": f"{i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2}\n#### {2 * i + 2}"} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def test_real_flow_runs_the_chain_on_the_users_model_and_data(prefect_api, tiny_llama_dir: Path, tmp_path: Path) -> None:
    from flows.pipeline import real

    params = {**TINY_PARAMS, **TINY_REAL, "artifacts_root": str(tmp_path / "artifacts"),
              "data": {"raw_train": _user_problems(tmp_path / "my_train.jsonl", "train", 30),
                       "raw_heldout": _user_problems(tmp_path / "my_test.jsonl", "test", 10),
                       "real_model": str(tiny_llama_dir)}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    first = real(params=load_params(tmp_path / "params.yaml"))
    assert list(first) == [stage.name for stage in members("real")] and not any(i["cached"] for i in first.values())

    root = tmp_path / "artifacts"
    imported = read_manifest(str(root / "import_model"))
    assert imported.inputs["source"].uri == str(tiny_llama_dir)  # the user's model, not the demo's GGUF
    assert imported.inputs["source"].content_hash == directory_content_hash(tiny_llama_dir)
    splits = read_manifest(str(root / "real_splits"))
    assert {ref.uri for ref in splits.inputs.values()} == {str(tmp_path / "my_train.jsonl"), str(tmp_path / "my_test.jsonl")}
    test_rows = (root / "real_splits/test.jsonl").read_text().splitlines()
    assert len(test_rows) == 6 and all(json.loads(r)["question"].startswith("test:") for r in test_rows)

    weights = {name: directory_content_hash(root / path) for name, path in
               [("base", "import_model"), ("sft", "real_sft"), ("grpo", "real_grpo_study.seeds/seed0"), ("dpo", "real_dpo")]}
    assert len(set(weights.values())) == 4, weights  # every training stage changed the weights it was given

    report = (root / "real_report/report.md").read_text()
    for name in ("real_base_gsm8k", "real_dpo_arithmetic", "real_sft_answer_loss", "real_grpo_study"):
        assert f"{root / name}" in report  # the report names every file it used
    assert "| after DPO |" in report and "held-out answer loss" in report and "over 2 seeds" in report
    metrics = read_manifest(str(root / "real_report")).metrics
    base = read_manifest(str(root / "real_base_gsm8k")).metrics
    assert metrics["base_gsm8k_greedy_accuracy"] == base["greedy_accuracy"]
    assert base["greedy_accuracy_ci95_low"] <= base["greedy_accuracy"] <= base["greedy_accuracy_ci95_high"]

    again = real(params=load_params(tmp_path / "params.yaml"))
    assert all(info["cached"] for info in again.values()), again
