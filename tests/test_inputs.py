"""A single-stage run never silently reads the params file's layout once the user names an input."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.artifacts import ComponentSpec, produce
from components.config import StrictConfig
from components.errors import ConfigError
from flows.inputs import INPUT_RULES, resolve_inputs
from flows.params import load_params
from flows.stages import STAGES_BY_NAME
from tests.conftest import write_params


class _Empty(StrictConfig):
    pass


def _artifact(dest: Path, name: str, inputs: dict[str, str]) -> str:
    def build(out_dir: Path, paths: dict[str, Path]) -> dict:
        (out_dir / "payload.txt").write_text(name, encoding="utf-8")
        return {}

    produce(ComponentSpec(name=name, version="1"), _Empty(), inputs, str(dest), build)
    return str(dest)


def test_every_rule_names_a_real_stage_input() -> None:
    for stage_name, rules in INPUT_RULES.items():
        assert set(rules) <= set(STAGES_BY_NAME[stage_name].inputs), stage_name


def test_no_input_named_reads_the_layout_and_says_so() -> None:
    layout = {"blocks": "artifacts/sft_data", "model": "artifacts/pretrain"}
    resolved = resolve_inputs("sft", layout, {})
    assert {name: (r.uri, r.origin) for name, r in resolved.items()} == {
        "blocks": ("artifacts/sft_data", "default"), "model": ("artifacts/pretrain", "default")}


def test_naming_one_input_requires_the_others() -> None:
    layout = {"blocks": "artifacts/sft_data", "model": "artifacts/pretrain"}
    with pytest.raises(ConfigError, match=r"--model \(the layout has artifacts/pretrain\)"):
        resolve_inputs("sft", layout, {"blocks": "mine/blocks"})
    resolved = resolve_inputs("sft", layout, {"blocks": "mine/blocks"}, layout_defaults=True)
    assert (resolved["model"].uri, resolved["model"].origin) == ("artifacts/pretrain", "default")


def test_optional_input_is_dropped_not_defaulted() -> None:
    layout = {"dataset": "data/raw/gsm8k/train.jsonl", "tokenizer": "artifacts/tokenizer", "select": "artifacts/curate"}
    resolved = resolve_inputs("sft_data", layout, {"dataset": "my_chats.jsonl", "tokenizer": "my_tok"})
    assert set(resolved) == {"dataset", "tokenizer"}


def test_dpo_policy_follows_from_the_reference(tmp_path: Path) -> None:
    model_file = tmp_path / "model.txt"
    model_file.write_text("weights", encoding="utf-8")
    model = _artifact(tmp_path / "my_sft", "sft", {"raw": str(model_file)})
    reference = _artifact(tmp_path / "my_reference", "dpo_reference", {"model": model})
    layout = {"reference": "artifacts/dpo_reference", "model": "artifacts/arithmetic_sft"}
    resolved = resolve_inputs("dpo", layout, {"reference": reference})
    assert resolved["model"].origin == "derived"
    assert Path(resolved["model"].uri).resolve() == Path(model).resolve()


def test_unknown_input_is_refused() -> None:
    with pytest.raises(ConfigError, match="no input named heldout"):
        resolve_inputs("sft", {"blocks": "b", "model": "m"}, {"heldout": "h"})


@pytest.mark.parametrize(("stage", "named", "missing"), [
    ("grpo", "problems", "heldout"), ("grpo_study", "problems", "heldout"), ("ppo", "problems", "heldout"),
    ("prompt_tuning", "dataset", "heldout"), ("evaluate", "model", "blocks"), ("pretrain", "blocks", "estimate"),
    ("curate", "input", "decontaminate_against"), ("reward_model", "pairs", "model"),
])
def test_the_stage_table_leaves_no_demo_input_behind(stage: str, named: str, missing: str, tmp_path: Path) -> None:
    """Issue 14 cases 2 and 5: held-out data and the unigram baseline's blocks must come from the user."""
    layout = STAGES_BY_NAME[stage].input_uris(load_params(write_params(tmp_path / "params.yaml", "artifacts")))
    with pytest.raises(ConfigError, match=rf"--{missing} \(the layout has "):
        resolve_inputs(stage, layout, {named: "mine.jsonl"})


def test_a_raw_file_has_nothing_to_derive_from(tmp_path: Path) -> None:
    """A TRL preference file is a file, not an artifact: the model must be named, not guessed."""
    pairs = tmp_path / "prefs.jsonl"
    pairs.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n', encoding="utf-8")
    layout = {"pairs": "artifacts/preference_pairs", "model": "artifacts/arithmetic_sft"}
    with pytest.raises(ConfigError, match=r"--model \(the layout has artifacts/arithmetic_sft\)"):
        resolve_inputs("reward_model", layout, {"pairs": str(pairs)})
