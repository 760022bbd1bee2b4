"""Working and episodic memory of an agent (CoALA, Sumers et al. 2023, §4.1).

Invariant: working memory holds exactly the ids the policy was conditioned on, never a
truncated or re-tokenised copy: RL trains on precisely what the policy saw.
"""

from __future__ import annotations

from typing import Any

from components.agents.search import DocumentStore
from components.errors import ConfigError, CrucibleError, DataError

CONTEXT_LIMIT = "context"  # the limit an episode stops with when its transcript would overflow the budget
EPISODIC_FORMAT_VERSION = 1


class WorkingMemory:
    """The episode's transcript as token ids within a budget of `budget_tokens`.

    Truncation policy: none. A segment (the prompt, a policy turn, an observation) is
    appended whole or not at all. When appending it would exceed the budget, nothing is
    appended, `limit_hit` becomes "context" and the episode stops there; the transcript keeps
    every id the policy was conditioned on. Dropping or summarising old turns would make the
    recorded trajectory differ from what the policy saw, which RL must not train on.
    The loop asks `fits(n)` before sampling up to n new tokens.

    The prompt counts as the first observation: `policy_tokens + observation_tokens == used_tokens`.
    """

    def __init__(self, budget_tokens: int):
        if budget_tokens < 1:
            raise ConfigError(f"WorkingMemory: budget_tokens must be at least 1, got {budget_tokens}")
        self.budget_tokens = budget_tokens
        self.limit_hit: str | None = None
        self._ids: list[int] = []
        self._policy_mask: list[int] = []

    @property
    def ids(self) -> list[int]:
        return list(self._ids)

    @property
    def policy_mask(self) -> list[int]:
        """1 on each id the policy generated, 0 on prompt and observation ids."""
        return list(self._policy_mask)

    @property
    def used_tokens(self) -> int:
        return len(self._ids)

    @property
    def remaining_tokens(self) -> int:
        return self.budget_tokens - len(self._ids)

    @property
    def policy_tokens(self) -> int:
        return sum(self._policy_mask)

    @property
    def observation_tokens(self) -> int:
        return len(self._ids) - self.policy_tokens

    def fits(self, n_tokens: int) -> bool:
        """Whether n more tokens stay within the budget."""
        return len(self._ids) + n_tokens <= self.budget_tokens

    def append(self, ids: list[int], from_policy: bool) -> bool:
        """Append a whole segment and return True, or, when it does not fit, append nothing,
        record the "context" limit and return False. Appending after the limit was hit is a
        bug in the caller (the episode has stopped): CrucibleError."""
        if self.limit_hit is not None:
            raise CrucibleError(f"WorkingMemory: the episode stopped at its {self.limit_hit!r} limit; nothing more "
                            "can be appended")
        if not self.fits(len(ids)):
            self.limit_hit = CONTEXT_LIMIT
            return False
        self._ids += ids
        self._policy_mask += [int(from_policy)] * len(ids)
        return True


class EpisodicMemory:
    """Past trials per task: outcome and self-reflection (Reflexion, Shinn et al. 2023, §3).

    Reflexion's agent reads its last reflections on the same task before the next trial
    (§3: a memory bounded to the most recent Omega reflections, Omega = 1 to 3); `retrieve`
    gives exactly those. `search` adds what Reflexion lacks: reflections of other tasks
    retrieved by BM25 (semantic memory over episodic contents, CoALA §4.1). `to_json` /
    `from_json` let the memory persist between runs as part of an artifact.
    """

    def __init__(self) -> None:
        self._trials: dict[str, list[dict[str, Any]]] = {}

    def add(self, task_key: str, trial: int, success: bool, reflection: str) -> None:
        """Record a trial's outcome and its reflection ("" when none was written, e.g. a success).
        Trials of a task are numbered increasingly; a repeated or older number is an error."""
        past = self._trials.setdefault(task_key, [])
        if past and trial <= past[-1]["trial"]:
            raise DataError(f"episodic memory: task {task_key!r} already has trial {past[-1]['trial']}; "
                            f"trial {trial} must come after it")
        past.append({"trial": trial, "success": bool(success), "reflection": reflection})

    def retrieve(self, task_key: str, k: int) -> list[str]:
        """The last k non-empty reflections on this task, oldest first ([] for an unseen task)."""
        if k < 0:
            raise DataError(f"episodic memory: k must be non-negative, got {k}")
        reflections = [t["reflection"] for t in self._trials.get(task_key, []) if t["reflection"]]
        return reflections[-k:] if k else []

    def trials(self, task_key: str) -> list[dict[str, Any]]:
        """The task's recorded trials (copies): trial, success, reflection."""
        return [dict(t) for t in self._trials.get(task_key, [])]

    def search(self, query: str, k: int) -> list[dict[str, Any]]:
        """Reflections of any task, best BM25 match first: dicts with task_key, trial, success,
        reflection, score."""
        entries = [(key, t) for key, trials in self._trials.items() for t in trials if t["reflection"]]
        store = DocumentStore([{"id": str(i), "title": "", "text": t["reflection"]}
                               for i, (_, t) in enumerate(entries)])
        return [{"task_key": entries[int(hit["id"])][0], **entries[int(hit["id"])][1], "score": hit["score"]}
                for hit in store.search(query, k)]

    def to_json(self) -> dict[str, Any]:
        return {"version": EPISODIC_FORMAT_VERSION, "tasks": {key: self.trials(key) for key in self._trials}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EpisodicMemory:
        """The memory `to_json` wrote; DataError naming the field at fault otherwise."""
        if not isinstance(data, dict) or data.get("version") != EPISODIC_FORMAT_VERSION:
            raise DataError(f"episodic memory: expected a dict with version {EPISODIC_FORMAT_VERSION}, "
                            f"got {data!r:.80}")
        memory = cls()
        for key in _field(data, "tasks", dict, "episodic memory"):
            for index, trial in enumerate(_field(data["tasks"], key, list, "episodic memory: tasks")):
                where = f"episodic memory: tasks[{key!r}][{index}]"
                if not isinstance(trial, dict):
                    raise DataError(f"{where}: expected a dict, got {type(trial).__name__}")
                memory.add(key, _field(trial, "trial", int, where), _field(trial, "success", bool, where),
                           _field(trial, "reflection", str, where))
        return memory


def _field(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field {key!r} must be {kind.__name__}, got {value!r}")
    return value
