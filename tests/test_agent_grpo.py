"""Agentic GRPO (components/train/agent_grpo.py): whole episodes as rollouts, the environment's
reward, each step's episode statistics logged, and a resumed run ending with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ConfigError
from components.runlog import PUBLISHED_STEP_LOG_FILE, read_metrics
from tests.conftest import build_tiny_lm


LIMITS = {"max_turns": 2, "max_new_tokens_per_turn": 6, "max_episode_tokens": 2048, "max_wall_seconds": 120}


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained one-layer Llama with room for the tools' system prompt (2048 positions)."""
    return build_tiny_lm(tmp_path_factory.mktemp("agent"), max_positions=2048)


def config(**train: object):
    from components.train.agent_grpo import AgentGRPOConfig

    return AgentGRPOConfig.model_validate({
        "env": {"name": "arithmetic", "arithmetic": {"digits": 2, "min_steps": 1, "max_steps": 1}},
        "group_size": 2, "limits": LIMITS, "dynamic_sampling": False,
        "train": {"precision": "fp32", "max_steps": 2, "batch_size_rows": 2, "checkpoint_every_steps": 1,
                  "optim": {"warmup_steps": 0, "learning_rate": 1e-3}, **train},
        "heldout": {"problems": 2, "samples": 0}})


def test_settings_that_are_not_the_agents_are_refused() -> None:
    from components.train.agent_grpo import AgentGRPOConfig

    for bad, named in (({"max_new_tokens": 8}, "max_new_tokens"), ({"rewards": [{"function": "format"}]}, "rewards"),
                       ({"env": {}}, "env.name")):
        with pytest.raises(ConfigError, match=named):
            AgentGRPOConfig.model_validate(bad)


def test_a_step_trains_on_episodes_and_logs_them_and_a_resume_gives_the_same_weights(
        tiny_agent: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from components.train.agent_grpo import agent_grpo

    straight = agent_grpo(config(), str(tiny_agent), str(tmp_path / "straight"))
    records = read_metrics(tmp_path / "straight" / PUBLISHED_STEP_LOG_FILE)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:  # every step logs its episodes: turns, tool calls, tool errors, limit hits
        assert 1 <= record["turns"] <= LIMITS["max_turns"]
        assert record["tool_calls"] >= 0 and record["tool_errors"] >= 0 and 0 <= record["success_rate"] <= 1
        hits = sum(v for k, v in record.items() if k.startswith("limit_hits/"))
        assert hits <= 2 * 2  # at most every episode of the step (2 tasks x G=2)
        assert record["response_length"] > 0  # the policy's own tokens only
    assert straight.metrics["env"] == "arithmetic" and straight.metrics["tools"] == ["calculator"]
    assert straight.metrics["heldout_problems"] == 2

    before, after = load_file(tiny_agent / "model.safetensors"), load_file(tmp_path / "straight/model.safetensors")
    assert any(not before[name].equal(after[name]) for name in before)  # the updates moved the policy

    (checkpoint,) = (tmp_path / "straight.runs").glob("*/checkpoints/step-00000001")
    resumed_run = agent_grpo(config(resume_from=str(checkpoint)), str(tiny_agent), str(tmp_path / "resumed"))
    assert [r["step"] for r in read_metrics(tmp_path / "resumed" / PUBLISHED_STEP_LOG_FILE)] == [2]
    # the checkpoint carries the run's totals: training FLOPs count step 1 too
    assert resumed_run.metrics["training_flops"] == straight.metrics["training_flops"]
    resumed = load_file(tmp_path / "resumed/model.safetensors")
    assert all(after[name].equal(resumed[name]) for name in after)
