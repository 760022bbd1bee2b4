"""Issue 14's systemic test: a new user with their own data and no demo run, stage by stage.

In an empty directory (no `artifacts/`), with a params file whose layout still points at the
demo's raw files, the user names every input and output of each stage command. Each stage
either reads only the user's files and artifacts (checked through its manifest's inputs) or
refuses, naming the inputs it lacks; nothing outside the named outputs is created or deleted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.cli import main
from tests.conftest import REPO_ROOT, write_params

pytestmark = pytest.mark.slow

NAMES = ["Ada", "Bruno", "Chloe", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kemal", "Lior"]
THINGS = ["apples", "marbles", "stamps", "pencils", "shells", "tickets", "cookies", "beads", "cards", "coins"]
PLACES = ["market", "garden", "library", "harbour", "school", "bakery", "museum"]

# The user's params: the tiny sizes of the test suite, curation filters for short rows, and
# the user's own reward function for GRPO. The layout (`data.raw_*`, `artifacts_root`) is the
# demo's: no stage below may read it.
OWN_SECTIONS = {
    "curate": {"num_shards": 1, "filters": {"gopher_quality": {"min_doc_words": 10, "max_non_alpha_words_ratio": 0.4},
                                            "gopher_repetition": {"enabled": False}}},
    "grpo": {"rewards": [{"function": "myreward:reward"}]},
}
REWARD_MODULE = '''
def reward(completion: str, reference: str) -> float:
    """The user's own reward: longer completions score higher, up to 1."""
    return min(len(completion), 20) / 20
'''


def _problem(i: int) -> dict[str, str]:
    """One GSM8K-style row with varied wording (curation drops templated near-duplicates)."""
    name, thing, place = NAMES[i % len(NAMES)], THINGS[i % len(THINGS)], PLACES[i % len(PLACES)]
    a, b = i % 7 + 2, i % 5 + 1
    return {"question": f"{name} went to the {place} and bought {a} {thing}, and then a friend gave {b} more "
                        f"{thing} to {name}. How many {thing} does {name} have now?",
            "answer": f"{name} has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} {thing}.\n#### {a + b}"}


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path.name


def _user_files(root: Path) -> dict[str, str]:
    """The user's own files, written into the empty working directory."""
    prefs = [{"prompt": f"What is {i % 7 + 2} + {i % 5 + 1}?", "chosen": f" {i % 7 + 2 + i % 5 + 1}",
              "rejected": f" {i % 7 + 2 + i % 5 + 2}"} for i in range(12)]
    (root / "myreward.py").write_text(REWARD_MODULE, encoding="utf-8")
    return {
        "train": _write_jsonl(root / "my_train.jsonl", [_problem(i) for i in range(60)]),
        "heldout": _write_jsonl(root / "my_heldout.jsonl", [_problem(i) for i in range(100, 110)]),
        "problems": _write_jsonl(root / "my_problems.jsonl", [_problem(i) for i in range(200, 216)]),
        "prefs": _write_jsonl(root / "my_prefs.jsonl", prefs),
    }


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _inside_outputs(path: str, outputs: list[str]) -> bool:
    """Under a named output, or a sibling it owns (`OUT.trials`, `OUT.shards`: parts of a fanned-out stage)."""
    return any(path.startswith(f"{out}/") or path.startswith(f"{out}.") for out in outputs)


def _manifest(root: Path, output: str) -> dict:
    return json.loads((root / output / "manifest.json").read_text(encoding="utf-8"))


def _run(root: Path, stage: str, config: str, inputs: dict[str, str], output: str, outputs: list[str],
         timings: dict[str, float]) -> dict:
    """Run one stage command with explicit inputs; check it read only what the user named
    (or what follows from it) and created nothing outside its output."""
    before = _tree(root)
    started = time.perf_counter()
    args = [stage, "--config", config, "--output", output]
    for name, uri in inputs.items():
        args += [f"--{name}", uri]
    assert main(args) == 0, stage
    timings[stage if stage not in timings else f"{stage} ({output})"] = round(time.perf_counter() - started, 1)
    outputs.append(output)
    after = _tree(root)
    assert {p: b for p, b in before.items() if p in after} == before, f"{stage} changed or deleted a file"
    assert [p for p in after if p not in before and not _inside_outputs(p, outputs)] == [], stage
    manifest = _manifest(root, output)
    for name, ref in manifest["inputs"].items():
        uri = ref["uri"]
        assert not uri.startswith(str(REPO_ROOT)) and not uri.startswith("artifacts"), (stage, name, uri)
        if name not in manifest["input_origins"]:  # a part of this stage (a curation shard)
            assert _inside_outputs(uri, [output]), (stage, name, uri)
            continue
        origin = manifest["input_origins"][name]
        assert origin == "given" if name in inputs else origin.startswith("derived: "), (stage, name, origin)
    return manifest


def _refused(config: str, stage: str, inputs: dict[str, str], missing: list[str],
             capsys: pytest.CaptureFixture) -> None:
    args = [stage, "--config", config, "--output", f"out/{stage}_refused"]
    for name, uri in inputs.items():
        args += [f"--{name}", uri]
    assert main(args) == 1
    error = capsys.readouterr().err
    for name in missing:
        assert f"--{name} (the layout has" in error, (stage, error)


def test_a_users_own_files_through_every_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))  # the custom reward module
    files = _user_files(tmp_path)
    config = write_params(tmp_path / "params.yaml", "artifacts", **OWN_SECTIONS).name
    lora = write_params(tmp_path / "lora.yaml", "artifacts", **OWN_SECTIONS, sft={"lora": {"r": 4}}).name
    outputs: list[str] = []
    timings: dict[str, float] = {}

    def run(stage: str, inputs: dict[str, str], output: str, params: str = config) -> dict:
        return _run(tmp_path, stage, params, inputs, output, outputs, timings)

    _refused(config, "curate", {"input": files["train"]}, ["decontaminate_against"], capsys)
    run("curate", {"input": files["train"], "decontaminate_against": files["heldout"]}, "out/curate")
    run("curate_heldout", {"input": files["heldout"]}, "out/curate_heldout")
    run("tokenizer", {"dataset": "out/curate"}, "out/tokenizer")
    run("pack", {"dataset": "out/curate", "tokenizer": "out/tokenizer"}, "out/blocks")
    run("estimate", {"tokenizer": "out/tokenizer"}, "out/estimate")
    _refused(config, "pretrain", {"blocks": "out/blocks"}, ["estimate"], capsys)
    pretrained = run("pretrain", {"blocks": "out/blocks", "estimate": "out/estimate"}, "out/pretrain")
    assert pretrained["input_origins"]["tokenizer"] == "derived: the tokenizer that out/blocks was built from"
    _refused(config, "evaluate", {"model": "out/pretrain"}, ["dataset", "blocks"], capsys)
    run("evaluate", {"model": "out/pretrain", "dataset": "out/curate_heldout", "blocks": "out/blocks"}, "out/evaluate")
    sft_data = run("sft_data", {"dataset": files["train"], "tokenizer": "out/tokenizer"}, "out/sft_data")
    assert "select" not in sft_data["inputs"]  # the demo's curation selection is not applied to the user's file
    run("sft", {"blocks": "out/sft_data", "model": "out/pretrain"}, "out/sft")
    assert run("sft", {"blocks": "out/sft_data", "model": "out/pretrain"}, "out/sft_lora", lora)["metrics"]["lora"]
    run("evaluate_sft", {"model": "out/sft", "dataset": files["heldout"]}, "out/evaluate_sft")
    _refused(config, "grpo", {"model": "out/sft", "problems": files["problems"]}, ["heldout"], capsys)
    grpo = run("grpo", {"model": "out/sft", "problems": files["problems"], "heldout": files["heldout"]}, "out/grpo")
    assert grpo["config"]["rewards"][0]["function"] == "myreward:reward"
    run("preference_pairs", {"model": "out/sft", "problems": files["problems"]}, "out/pairs")
    _refused(config, "reward_model", {"pairs": files["prefs"]}, ["model"], capsys)  # a TRL file has no model to follow
    run("reward_model", {"pairs": files["prefs"], "model": "out/sft"}, "out/reward_model")
    run("dpo_reference", {"pairs": files["prefs"], "model": "out/sft"}, "out/dpo_reference")
    dpo = run("dpo", {"reference": "out/dpo_reference"}, "out/dpo")
    assert dpo["inputs"]["model"]["uri"] == "out/sft"  # the policy is the reference's model, not the demo's
    run("ppo", {"model": "out/sft", "problems": files["problems"], "heldout": files["heldout"],
                "reward_model": "out/reward_model"}, "out/ppo")
    _refused(config, "prompt_tuning", {"model": "out/pretrain", "dataset": files["train"]}, ["heldout"], capsys)
    run("prompt_tuning", {"model": "out/pretrain", "dataset": files["train"], "heldout": files["heldout"]},
        "out/prompt_tuning")
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "data").exists()
    parts = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name not in {Path(o).name for o in outputs})
    print("stage wall times (s):", json.dumps(timings), "\nparts beside the named outputs:", parts)
