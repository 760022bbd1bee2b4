"""Configs: one validated model for every driver; bad values fail with the file and key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ConfigError
from components.models.factory import ModelConfig
from flows.params import PipelineParams, load_params
from tests.conftest import REPO_ROOT


def test_repository_params_file_is_valid() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, PipelineParams)
    assert params.pretrain.train.optim.learning_rate > 0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pretrain:\n  train:\n    optim:\n      learning_rate: -0.1\n", r"bad\.yaml: pretrain\.train\.optim\.learning_rate: Input should be greater than 0 \(got -0\.1\)"),
        ("pretrain:\n  max_step: 3\n", r"bad\.yaml: pretrain\.max_step: Extra inputs are not permitted"),
        ("tokenizer:\n  vocab_size: lots\n", r"bad\.yaml: tokenizer\.vocab_size: Input should be a valid integer"),
        ("pretrain:\n  model:\n    hidden_size: 100\n    num_heads: 3\n", r"pretrain\.model: Value error, num_heads \(3\) must divide hidden_size \(100\)"),
        ("curate: [1, 2]\n", r"bad\.yaml: curate: Input should be a valid dictionary"),
        ("pretrain: {max_steps: 1\n", r"bad\.yaml: not valid YAML"),
    ],
)
def test_bad_params_name_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_params(path)


def test_missing_params_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_params(tmp_path / "nope.yaml")


def test_configs_are_frozen_and_hash_stably() -> None:
    config = ModelConfig()
    with pytest.raises(Exception):
        config.hidden_size = 3  # type: ignore[misc]
    assert ModelConfig().config_hash() == config.config_hash()
    assert ModelConfig(num_layers=5).config_hash() != config.config_hash()


def test_components_never_import_prefect_or_dvc() -> None:
    offenders = [
        str(path.relative_to(REPO_ROOT))
        for path in (REPO_ROOT / "components").rglob("*.py")
        for line in path.read_text().splitlines()
        if line.strip().startswith(("import prefect", "from prefect", "import dvc", "from dvc"))
    ]
    assert offenders == []


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path: Path) -> None:
    from flows.params import load_params

    params = load_params(path)
    assert params.pretrain.train.max_steps > 0


def test_every_params_section_dvc_reads_is_in_the_params_files() -> None:
    """DVC refuses a stage whose params section is missing from params.yaml."""
    import yaml

    from tests.conftest import TINY_PARAMS

    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    sections = {entry.split(".")[0] for stage in stages.values() for entry in stage.get("params", [])}
    repository = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    assert sections <= repository.keys(), sections - repository.keys()
    assert sections <= TINY_PARAMS.keys(), sections - TINY_PARAMS.keys()


def test_the_pretrain_estimate_follows_the_trainers_precision_unless_set(tmp_path: Path) -> None:
    """A user's params without `estimate.precision` get the estimate of the run pretrain makes
    (its gate refuses an estimate in another precision); an explicit one is kept."""
    from flows.params import load_params
    from flows.stages import training_estimate_config
    from tests.conftest import write_params

    for requested, expected in (("bf16", "bf16"), ("fp32", "fp32")):
        params = load_params(write_params(tmp_path / f"{requested}.yaml", "artifacts", pretrain={
            "train": {"precision": requested, "batch_size_rows": 4, "max_steps": 8, "optim": {"warmup_steps": 8}}}))
        assert training_estimate_config(params).target.precision == expected
    pinned = load_params(write_params(tmp_path / "pinned.yaml", "artifacts", estimate={"precision": "fp32"}, pretrain={
        "train": {"precision": "bf16", "batch_size_rows": 4, "max_steps": 8, "optim": {"warmup_steps": 8}}}))
    assert training_estimate_config(pinned).target.precision == "fp32"
