"""Text environments for agents: multi-step big-number arithmetic, multi-hop lookup over a
fictional knowledge base, and GSM8K, each with its tools and an expert's demonstrations.

Invariant: an episode's reward is 1.0 exactly when its final answer (the first turn without a
tool call) equals the task's reference under `components.tasks.verifiers.is_correct`, and 0.0
otherwise; a turn with a tool call, well-formed or not, earns 0 and never ends the episode.

Semantics are Gymnasium's (`reset(seed) -> (observation, info)`, `step(action) -> (observation,
reward, done, info)`, seeded and procedurally generated), but `TextEnv` does not subclass
`gymnasium.Env`: Gymnasium's `step` returns five values (terminated and truncated apart) while
the shared spec fixes four (truncation is the agent loop's, which records the limit it hit);
`gymnasium.spaces.Text` needs a maximum length and a finite character set, which an assistant's
turn and a tool's output do not have, so a space would state a false bound; and gymnasium is
not a dependency of the platform (nothing here would use its wrappers or vector envs).

Seeds and splits: `SPLIT_SEEDS` gives train, validation and test disjoint seed ranges, and
`reset` refuses a seed in none. What each split's problems are:
  arithmetic  generated from the seed (`components.tasks.big_arithmetic`); a question repeats
              across splits only by chance (not excluded; negligible from 4 digits and 2 steps);
  lookup      the knowledge base is one (`EnvConfig.knowledge_base`); its subject entities are
              partitioned by position (8 of every 10 train, 1 validation, 1 test), so no test
              question asks about an entity a train question starts from;
  gsm8k       test seeds read `test.jsonl`; validation seeds read `gsm8k_validation_problems`
              rows of `train.jsonl` drawn with seed 0 exactly as `components.tasks.splits`
              draws them (the same rows as its validation.jsonl at its defaults); train seeds
              read the other rows of `train.jsonl`. Seed `start + i` of a split is its row
              `i mod rows` (in file order), so test problems are never trained on.

`demonstration(env, seed)` is an expert that steps the environment with scripted actions (the
steps' calculator calls; a search for each document of the chain; GSM8K's own calculator
annotations `<<a*b=c>>`) and then answers; the messages are returned only when the
environment rewarded the answer, so every demonstration is a verified solution.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.agents.search import DocumentStore
from components.agents.tools import ToolCall, ToolCallError, ToolError, ToolRegistry, parse_tool_call, registry_of
from components.config import StrictConfig
from components.errors import ConfigError, CrucibleError, DataError
from components.tasks.big_arithmetic import BigArithmeticConfig, problem
from components.tasks.calculator import CalculatorError, evaluate_arithmetic, format_number
from components.tasks.knowledge_base import MAX_HOPS, KnowledgeBaseConfig, generate_knowledge_base, lookup_question
from components.tasks.problems import gsm8k_final_answer, read_problems
from components.tasks.splits import sample_rows
from components.tasks.verifiers import is_correct

SPLIT_SEEDS = {"train": range(0, 10**6), "validation": range(10**6, 2 * 10**6), "test": range(2 * 10**6, 3 * 10**6)}
SUBJECT_SPLITS = ("train",) * 8 + ("validation", "test")  # lookup: subject i belongs to SUBJECT_SPLITS[i % 10]
GSM8K_VALIDATION_SEED = 0  # components.tasks.splits.ProblemSplitsConfig's default seed
_ANSWER = "Give your final answer as 'The answer is N.'"
INSTRUCTIONS = {
    "arithmetic": f"Compute the expression exactly. Use the calculator tool for every operation. {_ANSWER}",
    "lookup": ("Answer the question about fictional entities you cannot know: search the documents for each "
               f"entity in turn, following the links from one document to the next. {_ANSWER}"),
    "gsm8k": f"Solve the math word problem step by step. Use the calculator tool for arithmetic. {_ANSWER}",
}
NO_TOOLS_INSTRUCTIONS = {  # the same tasks when the agent has no tools (`EnvConfig.tools: []`)
    "arithmetic": f"Compute the expression exactly. {_ANSWER}",
    "lookup": f"Answer the question about fictional entities. {_ANSWER}",
    "gsm8k": f"Solve the math word problem step by step. {_ANSWER}",
}
DEFAULT_TOOLS = {"arithmetic": ("calculator",), "lookup": ("search",), "gsm8k": ("calculator",)}
_ANNOTATION = re.compile(r"<<([^<>=]+)=([^<>]*)>>")


class EnvConfig(StrictConfig):
    name: Literal["arithmetic", "lookup", "gsm8k"] | None = Field(
        None, description="The environment this config is for; None: whichever make_env is asked for.")
    arithmetic: BigArithmeticConfig = Field(default_factory=BigArithmeticConfig,
                                            description="arithmetic: digits and steps of its problems.")
    knowledge_base: KnowledgeBaseConfig = Field(default_factory=KnowledgeBaseConfig,
                                                description="lookup: the seed and size of its knowledge base.")
    lookup_hops: int = Field(2, ge=1, le=MAX_HOPS, description="lookup: documents a question needs retrieved.")
    gsm8k_dir: str = Field("data/raw/gsm8k", description="gsm8k: a directory with GSM8K's train.jsonl and test.jsonl.")
    gsm8k_validation_problems: int = Field(200, gt=0, description="gsm8k: rows of train.jsonl held out for validation.")
    tools: tuple[str, ...] | None = Field(None, description="Tool names (None: the environment's defaults).")


@dataclass(frozen=True)
class Task:
    """One problem: what the agent is asked, the reference `is_correct` checks against, and the
    expert's tool calls (each with a text its output must contain) and final answer."""

    task_id: str
    question: str
    reference: str
    answer: str
    expert_calls: tuple[tuple[ToolCall, str], ...]
    expert_answer: str


def split_of(seed: int) -> str:
    """The split whose seed range holds `seed`; ConfigError for a seed in none."""
    for split, seeds in SPLIT_SEEDS.items():
        if seed in seeds:
            return split
    raise ConfigError(f"seed {seed} is in no split of SPLIT_SEEDS (train, validation, test: 0..{3 * 10**6 - 1})")


class TextEnv:
    """An episode over one task: the observation of `reset` is the task's question, each
    `step` takes the assistant's turn (see the module's invariant)."""

    def __init__(self, name: str, tools: tuple[str, ...], registry: ToolRegistry, task_of: Callable[[int], Task]):
        self.name, self.tools, self.registry = name, tools, registry
        self.instructions = (INSTRUCTIONS if tools else NO_TOOLS_INSTRUCTIONS)[name]
        self._task_of = task_of
        self.task: Task | None = None
        self._done = True

    def reset(self, seed: int) -> tuple[str, dict[str, Any]]:
        split = split_of(seed)
        self.task, self._done = self._task_of(seed), False
        return self.task.question, {"task_id": self.task.task_id, "answer": self.task.answer, "split": split}

    def step(self, action: str) -> tuple[str, float, bool, dict[str, Any]]:
        if self._done:
            raise CrucibleError(f"{self.name} env: step() after the episode ended (or before reset); call reset(seed)")
        try:
            call = parse_tool_call(action, self.registry)
        except ToolCallError as error:
            return self._observed(None, None, str(error))
        if call is not None:
            try:
                return self._observed(call, self.registry.call(call), None)
            except ToolError as error:
                return self._observed(call, None, str(error))
        self._done = True
        correct = is_correct(action, self.task.reference)
        return "", float(correct), True, {"correct": correct, "tool_call": None, "tool_error": None}

    def _observed(self, call: ToolCall | None, output: str | None, error: str | None) -> tuple[str, float, bool, dict]:
        observation = output if error is None else f"Error: {error}"
        tool_call = None if call is None else {"name": call.name, "arguments": call.arguments}
        return observation, 0.0, False, {"tool_call": tool_call, "tool_output": output, "tool_error": error}


def _arithmetic_task(config: BigArithmeticConfig, seed: int) -> Task:
    drawn = problem(config, seed)
    calls = tuple((ToolCall("calculator", {"expression": step}), str(evaluate_arithmetic(step)))
                  for step in drawn["steps"])
    return Task(f"arithmetic:{seed}", drawn["question"], drawn["answer"], drawn["answer"], calls,
                f"The answer is {drawn['answer']}.")


def _lookup_task(kb: list[dict[str, Any]], hops: int, seed: int) -> Task:
    split = split_of(seed)
    subjects = {doc["id"] for i, doc in enumerate(kb) if SUBJECT_SPLITS[i % len(SUBJECT_SPLITS)] == split}
    drawn = lookup_question(kb, seed, hops, subjects)
    titles = {doc["id"]: doc["title"] for doc in kb}
    found = [titles[doc_id] for doc_id in drawn["chain"][1:]] + [drawn["answer"]]  # the next link, then the answer
    calls = tuple((ToolCall("search", {"query": titles[doc_id]}), expected)
                  for doc_id, expected in zip(drawn["chain"], found))
    return Task(f"lookup:{seed}", drawn["question"], drawn["answer"], drawn["answer"], calls,
                f"The answer is {drawn['answer']}.")


def gsm8k_splits(directory: Path, validation_problems: int) -> dict[str, list[tuple[str, str]]]:
    """(question, answer) rows per split (see the module doc); a missing or bad file is a
    DataError naming it (and its line)."""
    validation, train = sample_rows(directory / "train.jsonl", "gsm8k", validation_problems, GSM8K_VALIDATION_SEED)
    return {"train": [(row["question"], row["answer"]) for row in train],
            "validation": [(row["question"], row["answer"]) for row in validation],
            "test": read_problems(directory / "test.jsonl", "gsm8k", limit=2**62)}


def _gsm8k_task(splits: dict[str, list[tuple[str, str]]], seed: int) -> Task:
    split = split_of(seed)
    row = (seed - SPLIT_SEEDS[split].start) % len(splits[split])
    question, solution = splits[split][row]
    calls = []
    for expression, _ in _ANNOTATION.findall(solution):
        try:
            value = format_number(evaluate_arithmetic(expression))
            calls.append((ToolCall("calculator", {"expression": expression.strip()}), value))
        except CalculatorError:
            continue  # an annotation the calculator refuses is one the expert computes itself
    answer = gsm8k_final_answer(solution)
    worked = _ANNOTATION.sub("", solution).rpartition("####")[0] + f"The answer is {answer}."  # as INSTRUCTIONS ask
    return Task(f"gsm8k:{split}:{row}", question, solution, answer, tuple(calls), worked)


def make_env(name: str, config: EnvConfig | None = None, tools: ToolRegistry | None = None) -> TextEnv:
    """The environment `name` with `config`; `tools` replaces the registry built from
    `config.tools` (or the environment's default tools; search is over the lookup env's
    knowledge base, so other environments have no store for it)."""
    config = config or EnvConfig()
    if name not in INSTRUCTIONS or config.name not in (None, name):
        raise ConfigError(f"env {name!r}: expected one of {sorted(INSTRUCTIONS)}"
                          + (f" matching config.name {config.name!r}" if config.name else ""))
    store = None
    if name == "arithmetic":
        task_of = partial(_arithmetic_task, config.arithmetic)
    elif name == "lookup":
        kb = generate_knowledge_base(config.knowledge_base)
        store = DocumentStore(kb)
        task_of = partial(_lookup_task, kb, config.lookup_hops)
    else:
        task_of = partial(_gsm8k_task, gsm8k_splits(Path(config.gsm8k_dir), config.gsm8k_validation_problems))
    registry = tools if tools is not None else registry_of(DEFAULT_TOOLS[name] if config.tools is None else config.tools, store)
    return TextEnv(name, tuple(registry.names), registry, task_of)


def tool_call_text(call: ToolCall) -> str:
    """A call as the assistant writes it (the spec's Hermes format)."""
    return f"<tool_call>\n{json.dumps({'name': call.name, 'arguments': call.arguments})}\n</tool_call>"


def demonstration(env: TextEnv, seed: int) -> list[dict[str, str]]:
    """An expert's messages (system, user, assistant tool calls, tool results, final answer)
    that solve `seed`'s task, made by stepping `env`; DataError if the environment does not
    reward them (a tool failed, a result lacked what the expert needed from it, or the answer
    was wrong), so every demonstration is verified. The system message is the environment's
    instructions; `components.agents.tools.system_prompt(tokenizer, env.registry, env.instructions)`
    is the one to train with (the tools' schemas as that tokenizer's template takes them).
    Tool messages wrap the output in `<tool_response>` as the agent loop does."""
    question, info = env.reset(seed)
    messages = [{"role": "system", "content": env.instructions}, {"role": "user", "content": question}]
    for call, expected in env.task.expert_calls:
        action = tool_call_text(call)
        observation, _, _, step_info = env.step(action)
        if step_info["tool_error"] or expected not in observation:
            raise DataError(f"{info['task_id']}: the expert's call {action!r} did not give {expected!r}: "
                            f"{observation[:200]!r}")
        messages += [{"role": "assistant", "content": action},
                     {"role": "tool", "content": f"<tool_response>\n{observation}\n</tool_response>"}]
    _, reward, done, _ = env.step(env.task.expert_answer)
    if not (done and reward == 1.0):
        raise DataError(f"{info['task_id']}: the expert's answer {env.task.expert_answer!r} is not rewarded")
    return messages + [{"role": "assistant", "content": env.task.expert_answer}]
