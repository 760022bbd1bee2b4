"""The agent's decision loop: ReAct (Yao et al. 2022, "ReAct: Synergizing Reasoning and Acting
in Language Models", §2) think / act / observe over text environments, batched across
episodes, with Reflexion's trials (Shinn et al. 2023, "Reflexion: Language Agents with Verbal
Reinforcement Learning", §3) on top.

Invariant: an episode's context is its prompt ids followed, turn by turn, by the ids the
policy sampled (kept as sampled) and the observation ids the chat template renders after them;
the policy's ids are never decoded and re-encoded into the context.

Each turn every active episode's context is decoded in one `components.models.sampling.decode`
batch (the turn ends at the template's end-of-turn id, where decode stops). The decoded text is
the action `env.step` receives. The observation's ids are found by rendering the conversation
with the chat template with and without the tool turn: the difference (a suffix, checked) is
the tool message plus the next assistant header, and the template's own closing of the
assistant turn after the policy's end-of-turn id (ChatML's newline) goes before it.

Limits, checked before each turn, end an episode with reward 0 and are recorded in
`Trajectory.limit_hit`: `turns` (max_turns taken without a final answer), `tokens` (the context
plus a whole next turn would pass max_episode_tokens), `context` (... would pass the model's
positions), `wall_time` (max_wall_seconds since the batch started).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from components.agents.memory import EpisodicMemory, WorkingMemory
from components.agents.tools import render_prompt_ids, system_prompt, template_uses_tools
from components.agents.trajectory import Trajectory, Turn
from components.config import StrictConfig
from components.errors import ConfigError
from components.models.chat import check_context, context_tokens, prompt_ids, stop_ids


class AgentLimits(StrictConfig):
    max_turns: int = Field(6, ge=1, description="Turns (policy samples) per episode at most.")
    max_new_tokens_per_turn: int = Field(128, gt=0, description="Tokens the policy may sample in one turn.")
    max_episode_tokens: int = Field(1024, gt=0, description=(
        "Prompt + every turn's policy and observation ids at most; an episode whose context plus a whole next "
        "turn would pass it ends (limit `tokens`)."))
    max_wall_seconds: float = Field(120.0, gt=0, description="Wall time of a run_episodes batch at most.")


@dataclass
class _Episode:
    """One running episode: its environment, the conversation as messages (for rendering the
    template only), the trajectory it records and its working memory."""

    env: Any
    messages: list[dict[str, str]]
    trajectory: Trajectory
    memory: WorkingMemory  # the context: the same ids as trajectory.ids(), within the token budget
    tools: list[dict] | None  # the schemas the template renders itself (`tools=`), None when it cannot
    done: bool = False


def render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool,
           tools: list[dict] | None) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                              add_generation_prompt=generation_prompt, return_dict=True)["input_ids"])


def observation_ids(tokenizer: Any, messages: list[dict[str, str]], policy_ids: list[int],
                    tool_message: dict[str, str], tools: list[dict] | None = None) -> list[int]:
    """The ids that follow the policy's turn (`messages[-1]`, the assistant's text; its sampled
    ids `policy_ids`; `tools`: the `tools=` the prompt was rendered with): the template's
    closing of that turn after its end-of-turn id, the tool message, and the next assistant
    header. Raises ConfigError when the template does not render the conversation turn after
    turn (no clean suffix to split off)."""
    before = render(tokenizer, messages[:-1], True, tools)
    with_turn = render(tokenizer, messages, False, tools)
    after = render(tokenizer, messages + [tool_message], True, tools)
    stops = set(stop_ids(tokenizer))
    ends = [i for i in range(len(before), len(with_turn)) if with_turn[i] in stops]
    if with_turn[:len(before)] != before or after[:len(with_turn)] != with_turn or not ends:
        raise ConfigError(f"tokenizer {tokenizer.name_or_path!r}: its chat template does not render an assistant turn "
                          "and the tool message after it as a suffix of the conversation, so observation ids cannot "
                          "be split off without re-tokenising the policy's turn")
    closing = with_turn[ends[-1]:]
    if policy_ids and policy_ids[-1] == closing[0]:  # the policy sampled the end-of-turn id itself
        closing = closing[1:]
    return closing + after[len(with_turn):]


def tool_message(observation: str) -> dict[str, str]:
    """The tool's output as the conversation's next message (the spec's Hermes format)."""
    return {"role": "tool", "content": f"<tool_response>\n{observation}\n</tool_response>"}


def opening_messages(tokenizer: Any, env: Any, task: str, reflections: list[str]) -> list[dict[str, str]]:
    """The messages that open an episode: the environment's instructions and tools as the
    system prompt, then the task followed by the retrieved reflections of earlier trials
    (Reflexion §3)."""
    if reflections:
        task += "\n\nLessons from your earlier attempts at this task:\n" + "\n".join(f"- {r}" for r in reflections)
    return system_prompt(tokenizer, env.registry, env.instructions) + [{"role": "user", "content": task}]


def start(tokenizer: Any, env: Any, seed: int, episodic: Any, reflections_k: int, budget_tokens: int) -> _Episode:
    task, info = env.reset(seed)
    reflections = list(episodic.retrieve(info["task_id"], reflections_k)) if episodic is not None else []
    messages = opening_messages(tokenizer, env, task, reflections)
    trajectory = Trajectory(env=env.name, seed=seed, prompt_ids=render_prompt_ids(tokenizer, messages, env.registry),
                            reflections_used=reflections)
    memory = WorkingMemory(budget_tokens)
    memory.append(trajectory.prompt_ids, from_policy=False)
    tools = env.registry.schemas() if template_uses_tools(tokenizer) else None
    return _Episode(env=env, messages=messages, trajectory=trajectory, memory=memory, tools=tools)


def limit_reached(episode: _Episode, limits: AgentLimits, context: int, elapsed_seconds: float) -> str | None:
    """The limit that stops `episode` before its next turn, or None: the working memory's
    budget is the tighter of max_episode_tokens and the model's context, and must hold a
    whole next turn (or the last observation did not fit)."""
    if len(episode.trajectory.turns) >= limits.max_turns:
        return "turns"
    if episode.memory.limit_hit is not None or not episode.memory.fits(limits.max_new_tokens_per_turn):
        return "context" if context < limits.max_episode_tokens else "tokens"
    if elapsed_seconds > limits.max_wall_seconds:
        return "wall_time"
    return None


def act(tokenizer: Any, episode: _Episode, sampled_ids: list[int]) -> None:
    """The environment's step on the policy's turn, recorded with the observation ids after it
    (none after the final answer, or when they do not fit the working memory's budget)."""
    text = tokenizer.decode(sampled_ids, skip_special_tokens=True)
    observation, reward, done, info = episode.env.step(text)
    episode.memory.append(sampled_ids, from_policy=True)  # fits: limit_reached checked a whole turn
    episode.messages.append({"role": "assistant", "content": text})
    obs_ids: list[int] = []
    if not done:
        episode.messages.append(tool_message(observation))
        obs_ids = observation_ids(tokenizer, episode.messages[:-1], sampled_ids, episode.messages[-1], episode.tools)
        obs_ids = obs_ids if episode.memory.append(obs_ids, from_policy=False) else []
    episode.trajectory.turns.append(Turn(
        policy_ids=sampled_ids, text=text, tool_call=info.get("tool_call"), tool_output=info.get("tool_output"),
        tool_error=info.get("tool_error"), observation=observation, observation_ids=obs_ids, reward=float(reward)))
    if done:
        episode.done = True
        episode.trajectory.final_reward = float(reward)


def run_episodes(policy: Any, tokenizer: Any, envs: list[Any], seeds: list[int], limits: AgentLimits,
                 temperature: float, episodic: Any = None, reflections_k: int = 3) -> list[Trajectory]:
    """One episode per (env, seed), run together turn by turn (ReAct: the policy's turn is its
    thought and action, the environment's answer its observation). Each environment's
    `registry` and `instructions` make its system prompt; `episodic`: Reflexion's memory, whose
    last `reflections_k` reflections on a task (keyed by its task_id) open its prompt."""
    from components.models.sampling import decode

    if len(envs) != len(seeds):
        raise ConfigError(f"run_episodes: {len(envs)} environments for {len(seeds)} seeds")
    started = time.perf_counter()
    context = context_tokens(policy.config)
    budget_tokens = min(limits.max_episode_tokens, context)
    episodes = [start(tokenizer, env, seed, episodic, reflections_k, budget_tokens) for env, seed in zip(envs, seeds)]
    while True:
        active = []
        for episode in (e for e in episodes if not e.done):
            episode.trajectory.limit_hit = limit_reached(episode, limits, context, time.perf_counter() - started)
            episode.done = episode.trajectory.limit_hit is not None
            active += [] if episode.done else [episode]
        if not active:
            return [episode.trajectory for episode in episodes]
        rollout = decode(policy, tokenizer, [e.memory.ids for e in active], repeats=1,
                         max_new_tokens=limits.max_new_tokens_per_turn, temperature=temperature)
        lengths = rollout.completion_mask.sum(-1).long().tolist()
        for row, episode in enumerate(active):
            act(tokenizer, episode, rollout.input_ids[row, rollout.prompt_width:][:lengths[row]].tolist())


REFLECTION_PROMPT = ("You attempted the task in the transcript below and did not solve it{why}.\n\n{transcript}\n\n"
                     "In one or two sentences, say what went wrong and what you will do differently next time. "
                     "Do not solve the task.")


def reflection_prompt_ids(tokenizer: Any, trajectory: Trajectory, room_tokens: int) -> list[int]:
    """The reflection prompt on `trajectory` within `room_tokens`: its transcript (the whole
    context, as text) is cut from the left to fit, so the tools' system text goes first and
    the latest turns stay."""
    why = f" (stopped by the {trajectory.limit_hit} limit)" if trajectory.limit_hit else ""
    overhead_tokens = len(prompt_ids(tokenizer, REFLECTION_PROMPT.format(why=why, transcript="")))
    ids = trajectory.ids()
    keep_tokens = max(0, room_tokens - overhead_tokens)
    kept = ids[max(0, len(ids) - keep_tokens):] if keep_tokens else []
    transcript = tokenizer.decode(kept, skip_special_tokens=True)
    return prompt_ids(tokenizer, REFLECTION_PROMPT.format(why=why, transcript=transcript))


@dataclass(frozen=True)
class Reflection:
    """A reflection the policy wrote: its text, and the tokens its decode read and sampled."""

    text: str
    prompt_tokens: int
    sampled_tokens: int


def reflect_all(policy: Any, tokenizer: Any, trajectories: list[Trajectory], max_new_tokens: int = 64,
                temperature: float = 0.0) -> list[Reflection]:
    """Reflexion's self-reflection (Shinn et al. 2023, §3: the self-reflection model turns a
    failed trajectory and its sparse reward into verbal feedback for the next trial), asked of
    the policy itself on as much of each transcript as its context holds, all in one batch."""
    from components.models.sampling import decode

    context = context_tokens(policy.config)
    prompts = [reflection_prompt_ids(tokenizer, t, context - max_new_tokens) for t in trajectories]
    for trajectory, prompt in zip(trajectories, prompts, strict=True):  # re-encoding the cut transcript may add ids
        check_context([prompt], max_new_tokens, context, f"reflection on {trajectory.env} seed {trajectory.seed}",
                      tokenizer.name_or_path)
    rollout = decode(policy, tokenizer, prompts, repeats=1, max_new_tokens=max_new_tokens, temperature=temperature)
    sampled = rollout.completion_mask.sum(-1).long().tolist()
    return [Reflection(text.strip(), len(prompt), count)
            for text, prompt, count in zip(rollout.texts, prompts, sampled, strict=True)]


def reflect(policy: Any, tokenizer: Any, trajectory: Trajectory, max_new_tokens: int = 64,
            temperature: float = 0.0) -> str:
    """The policy's reflection on one failed trajectory (`reflect_all` of one)."""
    return reflect_all(policy, tokenizer, [trajectory], max_new_tokens, temperature)[0].text


def run_trials_batched(policy: Any, tokenizer: Any, envs: list[Any], seeds: list[int], trials: int,
                       limits: AgentLimits, temperature: float, memory: EpisodicMemory | None = None,
                       reflection_tokens: int = 64, reflections_k: int = 3
                       ) -> list[tuple[list[Trajectory], list[Reflection]]]:
    """Up to `trials` trials of each task (Reflexion §3), the tasks run together: each trial's
    episodes of the tasks not yet solved are decoded in one batch, then the reflections on its
    failures. Each trial's outcome and reflection go into episodic `memory` (a fresh one by
    default) under the task's id, and the next trial's prompt carries the task's last
    `reflections_k` reflections; a task stops at its first success. `envs`: one environment
    object per task (an episode keeps its environment's state). Per task: its trajectories and
    the reflections written after each failed trial but the last."""
    if trials < 1:
        raise ConfigError(f"run_trials: trials must be at least 1, got {trials}")
    memory = EpisodicMemory() if memory is None else memory
    keys = [env.reset(seed)[1]["task_id"] for env, seed in zip(envs, seeds, strict=True)]
    if len(set(keys)) != len(keys):  # one memory holds every task's trials, keyed by task id
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ConfigError(f"run_trials: seeds {seeds} give the same task more than once ({', '.join(repeated)}); "
                          "run each task once per batch")
    results: list[tuple[list[Trajectory], list[Reflection]]] = [([], []) for _ in seeds]
    pending = list(range(len(seeds)))
    for trial in range(1, trials + 1):
        for task, trajectory in zip(pending, run_episodes(policy, tokenizer, [envs[i] for i in pending],
                                                          [seeds[i] for i in pending], limits, temperature,
                                                          episodic=memory, reflections_k=reflections_k)):
            results[task][0].append(trajectory)
        failed = [task for task in pending if results[task][0][-1].final_reward <= 0]
        reflections = reflect_all(policy, tokenizer, [results[task][0][-1] for task in failed], reflection_tokens,
                                  temperature) if failed and trial < trials else []
        written = dict(zip(failed, reflections))
        for task in pending:
            reflection = written.get(task)
            memory.add(keys[task], len(memory.trials(keys[task])) + 1, task not in failed,
                       reflection.text if reflection else "")
            if reflection:
                results[task][1].append(reflection)
        pending = failed
        if not reflections:
            break
    return results


def run_trials(policy: Any, tokenizer: Any, env: Any, seed: int, trials: int, limits: AgentLimits,
               temperature: float, memory: EpisodicMemory | None = None, reflection_tokens: int = 64,
               reflections_k: int = 3) -> list[Trajectory]:
    """`run_trials_batched` on one task: its trajectories, the last a success or the last trial."""
    return run_trials_batched(policy, tokenizer, [env], [seed], trials, limits, temperature, memory,
                              reflection_tokens, reflections_k)[0][0]
