"""Tool-use demonstrations for SFT: the expert's verified episodes as chats.

Invariant: every trace is an episode the environment rewarded (`envs.demonstration` raises
otherwise), opened exactly as the agent loop opens an episode for the same tokenizer
(`tools.system_prompt`: the instructions, plus the tools' schemas where the template does not
render `tools=`), so SFT teaches the format the agent is later run and trained in.

Traces come from the environment's `train` seeds only; `train.jsonl` holds one chat per line
in TRL's conversational format (`{"messages": [...]}`, tool outputs as role `tool`), which
`components.data.sft_data` (format `messages`) tokenizes with the assistant turns as the only
labels; `sources.jsonl` names each line's environment and seed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from components.agents.envs import SPLIT_SEEDS, EnvConfig, demonstration, make_env
from components.agents.tools import system_prompt
from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.errors import ConfigError

SPEC = ComponentSpec(name="agent_traces", version="1")
TRACES_FILE = "train.jsonl"
SOURCES_FILE = "sources.jsonl"  # line i: the environment and seed of train.jsonl's line i


class AgentTracesConfig(StrictConfig):
    envs: list[EnvConfig] = Field(min_length=1, description="The environments demonstrated (each names its env).")
    examples_per_env: int = Field(400, gt=0, description="Demonstrations per environment, from its first train seeds.")


def _demonstrations(tokenizer: Any, config: EnvConfig, examples: int) -> tuple[list[dict[str, Any]], int]:
    """`examples` verified chats of one environment, and their tool calls."""
    if config.name is None:
        raise ConfigError("agent_traces.envs: every environment needs its name (arithmetic, lookup or gsm8k)")
    env = make_env(config.name, config)
    opening = system_prompt(tokenizer, env.registry, env.instructions)
    records, calls = [], 0
    for seed in SPLIT_SEEDS["train"][:examples]:
        messages = demonstration(env, seed)  # messages[0] is the instructions alone; `opening` adds the tools
        calls += sum(1 for m in messages if m["role"] == "tool")
        records.append({"messages": opening + messages[1:], "source": {"env": env.name, "seed": seed}})
    return records, calls


def _build(config: AgentTracesConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    metrics: dict[str, Any] = {"examples": 0}
    with open(out_dir / TRACES_FILE, "w", encoding="utf-8") as traces, \
            open(out_dir / SOURCES_FILE, "w", encoding="utf-8") as sources:
        for env_config in config.envs:
            records, calls = _demonstrations(tokenizer, env_config, config.examples_per_env)
            traces.writelines(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in records)
            sources.writelines(json.dumps(r["source"]) + "\n" for r in records)
            metrics["examples"] += len(records)
            metrics[f"{env_config.name}_tool_calls_per_example"] = calls / len(records)
    return metrics


def agent_traces(config: AgentTracesConfig, tokenizer: str, dest: str, overwrite: bool = False) -> Manifest:
    """Demonstrations of `config.envs` for SFT (one environment after another; SFT shuffles),
    opened as the agent loop opens episodes with `tokenizer` (a model or tokenizer artifact)."""
    return produce(SPEC, config, {"tokenizer": tokenizer}, dest, lambda out, paths: _build(config, paths, out),
                   overwrite)
