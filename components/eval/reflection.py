"""Self-reflection (Agent Studies ch. 2; Shinn et al. 2023, "Reflexion"): an agent is a loop of
states and actions. The state is the chat so far; the action is the next answer. After a
failed attempt, the model sees its previous answer and feedback and tries again, up to R
rounds:

- `verifier` feedback: the verifier's verdict ("Your answer 12 is incorrect.");
- `self` feedback: the model first writes a critique of its own answer (one more generation),
  which is appended as the feedback.

Accuracy is reported per round. With `verifier` feedback the verifier also decides when to
stop, so round r counts a problem as solved if any attempt up to r was correct (compare it
with oracle best-of-n, which also uses the answer key). With `self` feedback the answer key is
never shown: every problem runs every round and round r scores the latest answer. Every round's
generated tokens are counted, so reflection is compared with best-of-n at equal compute; no
feedback is written after the last round (a critique nobody reads would only add cost).

Each problem's transcript (every attempt with its verdict and the feedback that followed it) is
returned too, so the per-round accuracies can be recomputed by hand from the evaluator's
samples file: with `verifier` feedback round r counts a problem whose attempts up to r include a
correct one; with `self` feedback, one whose attempt at round r is correct.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from components.errors import ConfigError
from components.models.chat import prompt_ids
from components.models.sampling import sample
from components.tasks.verifiers import extract_answer, is_correct

Feedback = Literal["verifier", "self"]
CRITIQUE_REQUEST = "Check the solution above step by step and point out any mistake."
Chat = list[dict[str, str]]


@dataclass(frozen=True)
class ReflectionResult:
    accuracy_by_round: list[float]  # solved at round r (r = 0 is the first attempt), as the module doc counts it
    generated_tokens_by_round: list[float]  # cumulative mean per problem
    prompt_tokens_by_round: list[float]  # cumulative mean per problem (every round re-reads the chat)
    transcripts: list[list[dict[str, Any]]]  # per problem, its attempts: round, answer, correct, feedback, ...


def _verdict(text: str) -> str:
    answer = extract_answer(text)
    shown = f"Your answer {answer} is incorrect." if answer is not None else "Your answer has no final number."
    return f"{shown} Try again and end with #### and the final answer."


def _self_feedback(model: Any, tokenizer: Any, chat: Chat, max_new_tokens: int, temperature: float,
                   seed: int) -> tuple[dict[str, Any], int, int]:
    """The model's critique of the last answer of `chat` as the next user turn; returns the
    transcript fields (critique, feedback), its generated tokens and its prompt tokens."""
    critique_chat = [*chat, {"role": "user", "content": CRITIQUE_REQUEST}]
    (critique,), = sample(model, tokenizer, [critique_chat], n=1, max_new_tokens=max_new_tokens,
                          temperature=temperature, seed=seed)
    note = f"{critique.text}\nUse this critique, try again and end with #### and the final answer."
    fields = {"critique": critique.text, "critique_tokens": critique.generated_tokens, "feedback": note}
    return fields, critique.generated_tokens, len(prompt_ids(tokenizer, critique_chat))


def reflect(model: Any, tokenizer: Any, questions: list[str], references: list[str], rounds: int,
            max_new_tokens: int, feedback: Feedback = "verifier", temperature: float = 0.7, seed: int = 0
            ) -> ReflectionResult:
    if rounds < 0:
        raise ConfigError(f"rounds must be >= 0, got {rounds}")
    chats: list[Chat] = [[{"role": "user", "content": q}] for q in questions]
    transcripts: list[list[dict[str, Any]]] = [[] for _ in questions]
    solved = [False] * len(questions)
    accuracy, generated, prompts = [], [], []
    total_generated = total_prompt = 0.0
    for round_index in range(rounds + 1):
        pending = [i for i, done in enumerate(solved) if not done or feedback == "self"]
        outputs = sample(model, tokenizer, [chats[i] for i in pending], n=1, max_new_tokens=max_new_tokens,
                         temperature=temperature, seed=seed + round_index) if pending else []
        for i, (attempt,) in zip(pending, outputs, strict=True):
            total_generated += attempt.generated_tokens
            total_prompt += len(prompt_ids(tokenizer, chats[i]))
            solved[i] = is_correct(attempt.text, references[i])  # self: the latest answer is the one that counts
            entry: dict[str, Any] = {"round": round_index, "answer": attempt.text, "correct": solved[i],
                                     "generated_tokens": attempt.generated_tokens, "feedback": None}
            if round_index < rounds and (feedback == "self" or not solved[i]):
                chats[i] = [*chats[i], {"role": "assistant", "content": attempt.text}]
                if feedback == "self":
                    fields, critique_tokens, critique_prompt = _self_feedback(
                        model, tokenizer, chats[i], max_new_tokens, temperature, seed + round_index)
                    entry |= fields
                    total_generated += critique_tokens
                    total_prompt += critique_prompt
                else:
                    entry["feedback"] = _verdict(attempt.text)
                chats[i] = [*chats[i], {"role": "user", "content": entry["feedback"]}]
            transcripts[i].append(entry)
        accuracy.append(sum(solved) / len(questions))
        generated.append(total_generated / len(questions))
        prompts.append(total_prompt / len(questions))
    return ReflectionResult(accuracy, generated, prompts, transcripts)
