"""An agent's episode as it was sampled: token-in/token-out trajectories, their RL rollout
form, and their deterministic replay.

Invariant: a trajectory's ids are exactly the ids the policy sampled and the observation ids
appended after them, in order; nothing is ever re-tokenised from text (decode-then-encode can
merge or split tokens, and the policy would then be trained on ids it never sampled).

`rollout_of` turns trajectories into the `components.models.sampling.Rollout` the GRPO loss
consumes: the completion is every id after the prompt, and `completion_mask` is 1 only on
ids the policy generated, so tool outputs and template tokens are masked from the loss (as
in multi-turn RL with tools: verl's multi-turn rollouts, TRL's tool masking). `replay`
re-runs the environment on the recorded actions: a trajectory is reproducible evidence, not
just a log.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from components.errors import DataError

if TYPE_CHECKING:
    from components.models.sampling import Rollout

LIMITS = ("turns", "tokens", "wall_time", "context")  # what can end an episode before a final answer


@dataclass
class Turn:
    """One think/act/observe step: the policy's sampled ids and their text (the action), what
    the environment did with it, and the observation ids appended to the context after it
    (empty after the final answer)."""

    policy_ids: list[int]
    text: str
    tool_call: dict | None  # {"name", "arguments"} of the executed call, None without one
    tool_output: str | None
    tool_error: str | None  # a malformed call or a failing tool: the message the agent saw
    observation: str  # the environment's observation text, as `env.step` returned it
    observation_ids: list[int]
    reward: float


@dataclass
class Trajectory:
    env: str
    seed: int
    prompt_ids: list[int]
    turns: list[Turn] = field(default_factory=list)
    final_reward: float = 0.0
    limit_hit: str | None = None  # one of LIMITS, or None when the episode ended with a final answer
    reflections_used: list[str] = field(default_factory=list)

    def ids(self) -> list[int]:
        """The whole context: prompt, then each turn's policy ids and observation ids."""
        ids = list(self.prompt_ids)
        for turn in self.turns:
            ids += turn.policy_ids + turn.observation_ids
        return ids

    def policy_mask(self) -> list[int]:
        """1 on each id the policy generated, 0 on the prompt and observations; aligned with `ids()`."""
        mask = [0] * len(self.prompt_ids)
        for turn in self.turns:
            mask += [1] * len(turn.policy_ids) + [0] * len(turn.observation_ids)
        return mask

    def turn_decodes(self) -> list[tuple[int, int]]:
        """Each turn's decode as (context tokens it read, tokens it sampled): the loop decodes every
        turn from the whole context (no cache across turns), so a turn processes C + g - 1 tokens."""
        decodes, context = [], len(self.prompt_ids)
        for turn in self.turns:
            decodes.append((context, len(turn.policy_ids)))
            context += len(turn.policy_ids) + len(turn.observation_ids)
        return decodes

    @property
    def finished(self) -> bool:
        """Ended by a final answer (no limit hit)."""
        return self.limit_hit is None and bool(self.turns)

    @property
    def answer(self) -> str:
        """The final answer's text; empty when a limit ended the episode."""
        return self.turns[-1].text if self.finished else ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Trajectory:
        """The trajectory `to_json` wrote; a record with missing or unknown keys is a DataError."""
        try:
            turns = [Turn(**turn) for turn in record["turns"]]
            trajectory = cls(**{**record, "turns": turns})
        except (KeyError, TypeError) as error:
            raise DataError(f"trajectory record (env {record.get('env')!r}, seed {record.get('seed')!r}): "
                            f"{error}") from error
        if trajectory.limit_hit is not None and trajectory.limit_hit not in LIMITS:
            raise DataError(f"trajectory record: limit_hit {trajectory.limit_hit!r} is not one of {LIMITS}")
        return trajectory


def rollout_of(trajectories: list[Trajectory], pad_id: int) -> Rollout:
    """The GRPO rollout of whole episodes: prompts left-padded to the widest, completions (every
    id after the prompt) right-padded; completion_mask 1 only on the policy's ids."""
    import torch

    from components.models.sampling import Rollout, left_pad

    if not trajectories:
        raise DataError("rollout_of: no trajectories")
    prompts, prompt_mask = left_pad([t.prompt_ids for t in trajectories], pad_id)
    completions = [t.ids()[len(t.prompt_ids):] for t in trajectories]
    policy = [t.policy_mask()[len(t.prompt_ids):] for t in trajectories]
    width = max(1, max(len(c) for c in completions))
    completion_ids = torch.tensor([c + [pad_id] * (width - len(c)) for c in completions], dtype=torch.long)
    real = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions], dtype=torch.long)
    completion_mask = torch.tensor([m + [0] * (width - len(m)) for m in policy], dtype=torch.float)
    return Rollout(input_ids=torch.cat([prompts, completion_ids], dim=1),
                   attention_mask=torch.cat([prompt_mask, real], dim=1), completion_mask=completion_mask,
                   prompt_width=prompts.shape[1], texts=[t.answer for t in trajectories],
                   finished=[t.finished for t in trajectories])


def replay(trajectory: Trajectory, env: Any) -> list[tuple[str, float, bool]]:
    """Re-run `env` from `reset(seed)` on the recorded action texts; returns each step's
    (observation, reward, done), and raises DataError at the first step whose observation,
    reward or done differs from the record (a tampered or non-deterministic trajectory)."""
    env.reset(trajectory.seed)
    steps = []
    for index, turn in enumerate(trajectory.turns):
        observation, reward, done, _ = env.step(turn.text)
        expected_done = index == len(trajectory.turns) - 1 and trajectory.limit_hit is None
        recorded = (turn.observation, turn.reward, expected_done)
        if (observation, reward, done) != recorded:
            raise DataError(f"replay of {trajectory.env} seed {trajectory.seed}, turn {index}: the environment gave "
                            f"{(observation, reward, done)!r}, the trajectory records {recorded!r}")
        steps.append((observation, reward, done))
    return steps
