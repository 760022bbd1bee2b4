"""Record schemas for the dataset formats the platform trains on, and GSM8K converters.

Each training stage reads one record shape: raw text for pretraining, prompt/completion or
chat transcripts for SFT, chosen/rejected pairs for preference tuning, and prompts with a
checkable reference answer for RL. Validating every row against a pydantic schema at the
boundary means a malformed row fails once, naming the file, row and field, instead of
surfacing as a shape error deep inside tokenization or a silently empty loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError, ValidationInfo, field_validator

from components.errors import ConfigError, DataError
from components.tasks.problems import gsm8k_final_answer

RecordT = TypeVar("RecordT", bound="Record")


def _not_blank(value: str) -> str:
    """Empty or whitespace-only text trains nothing and usually means a broken export."""
    if not value.strip():
        raise ValueError("must not be empty or whitespace only")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]


class Record(BaseModel):
    """Base of every record schema.

    Unknown fields are rejected because a misspelt key ("completon") would otherwise be
    dropped silently and the real field reported missing far from the cause; records are
    frozen so a validated row cannot be changed into an invalid one afterwards.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class PretrainText(Record):
    text: Text


class SFTPromptCompletion(Record):
    prompt: Text
    completion: Text


class ChatMessage(Record):
    role: Literal["system", "user", "assistant", "tool"]  # tool: a tool's output (agent traces), never trained on
    content: Text


class SFTChat(Record):
    messages: list[ChatMessage]

    @field_validator("messages")
    @classmethod
    def _has_an_assistant_turn(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        """Only assistant turns carry loss; a chat without one would contribute zero loss tokens."""
        if not any(message.role == "assistant" for message in messages):
            raise ValueError("needs at least one assistant turn (only assistant turns are trained on)")
        return messages


class PreferencePair(Record):
    prompt: Text
    chosen: Text
    rejected: Text

    @field_validator("rejected")
    @classmethod
    def _differs_from_chosen(cls, rejected: str, info: ValidationInfo) -> str:
        """Identical responses give a zero preference margin: no signal, only noise in the batch."""
        chosen = info.data.get("chosen")
        if chosen is not None and chosen.strip() == rejected.strip():
            raise ValueError("must differ from 'chosen'")
        return rejected


class ChatPreferencePair(Record):
    """TRL's conversational preference format: `prompt` is the conversation so far, `chosen` and
    `rejected` are the assistant's alternative replies (each a list of messages).

    The prompt must end with a user turn and each reply must start with an assistant turn:
    otherwise the pair does not compare two answers to one request, and the prompt could not
    be rendered with the template's generation prompt that the replies are scored after.
    """

    prompt: list[ChatMessage]
    chosen: list[ChatMessage]
    rejected: list[ChatMessage]

    @field_validator("prompt")
    @classmethod
    def _ends_with_a_user_turn(cls, prompt: list[ChatMessage]) -> list[ChatMessage]:
        if not prompt or prompt[-1].role != "user":
            last = prompt[-1].role if prompt else "nothing"
            raise ValueError(f"must end with a user turn (ends with {last}): the replies answer it")
        return prompt

    @field_validator("chosen", "rejected")
    @classmethod
    def _starts_with_an_assistant_turn(cls, reply: list[ChatMessage]) -> list[ChatMessage]:
        if not reply or reply[0].role != "assistant":
            first = reply[0].role if reply else "nothing"
            raise ValueError(f"must start with an assistant turn (starts with {first}): it is the reply scored")
        return reply

    @field_validator("rejected")
    @classmethod
    def _differs_from_chosen(cls, rejected: list[ChatMessage], info: ValidationInfo) -> list[ChatMessage]:
        """As for text pairs: identical replies carry no preference."""
        chosen = info.data.get("chosen")
        if chosen is not None and _stripped(chosen) == _stripped(rejected):
            raise ValueError("must differ from 'chosen'")
        return rejected


def _stripped(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(message.role, message.content.strip()) for message in messages]


class ImplicitChatPreferencePair(Record):
    """TRL's conversational preference format with an implicit prompt: `chosen` and `rejected`
    are whole conversations that share their opening turns (see `split_implicit_prompt`)."""

    chosen: list[ChatMessage]
    rejected: list[ChatMessage]


def split_implicit_prompt(pair: ImplicitChatPreferencePair, where: str) -> ChatPreferencePair:
    """The explicit form of an implicit-prompt pair: the leading messages both conversations
    share (compared exactly) are the prompt, the rest of each is its reply, as TRL's
    `extract_prompt` splits them. A split that leaves no user turn to answer, or a reply that
    does not start with the assistant, is refused by `ChatPreferencePair`'s checks."""
    shared = 0
    for ours, theirs in zip(pair.chosen, pair.rejected):
        if ours != theirs:
            break
        shared += 1
    fields = {"prompt": pair.chosen[:shared], "chosen": pair.chosen[shared:], "rejected": pair.rejected[shared:]}
    return validate_record(ChatPreferencePair, fields,
                           f"{where} (implicit prompt: the {shared} leading messages 'chosen' and 'rejected' share)")


class RLPrompt(Record):
    prompt: Text
    reference_answer: Text


FORMATS: dict[str, type[Record]] = {
    "pretrain": PretrainText,
    "sft": SFTPromptCompletion,
    "chat": SFTChat,
    "preference": PreferencePair,
    "chat_preference": ChatPreferencePair,
    "rl": RLPrompt,
}


def _describe_errors(error: ValidationError, where: str) -> str:
    """`where: field 'a.b': message` per problem, so the user can go straight to the cell."""
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "<record>"
        message = str(item["ctx"]["error"]) if item["type"] == "value_error" else item["msg"]
        problems.append(f"{where}: field '{field}': {message}")
    return "; ".join(problems)


def validate_record(model: type[RecordT], data: Any, where: str) -> RecordT:
    """Validate one record, turning pydantic's error into a DataError that names `where`."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise DataError(_describe_errors(error, where)) from None


def validate_records(records: Iterable[tuple[int, dict[str, Any]]], fmt: str, source: str) -> list[Record]:
    """Validate (row, record) pairs, e.g. from `read_jsonl`, against the schema of `fmt`.

    Fails on the first bad row with `source:row: field 'x': message`: one precise error is
    actionable, a thousand copies of the same export bug are not.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"{source}: unknown dataset format {fmt!r} (known: {', '.join(sorted(FORMATS))})")
    model = FORMATS[fmt]
    return [validate_record(model, record, f"{source}:{row}") for row, record in records]


# --- GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems") ---------

def _gsm8k_fields(record: dict[str, Any], where: str) -> tuple[str, str]:
    """(question, answer) of a raw GSM8K row; a missing or non-text field is named."""
    values = []
    for field in ("question", "answer"):
        value = record.get(field)
        if not isinstance(value, str):
            problem = "missing" if value is None else f"must be a string, got {type(value).__name__}"
            raise DataError(f"{where}: field '{field}': {problem} (record has {sorted(record)})")
        values.append(value.strip())
    return values[0], values[1]


def gsm8k_to_sft(record: dict[str, Any], where: str = "gsm8k record") -> SFTPromptCompletion:
    """Prompt = question; completion = the worked solution ending in '#### N', verbatim.

    The `<<48/2=24>>` calculator annotations are kept. They are part of the reference
    solutions as published: GSM8K's authors trained on them so that at sampling time a
    calculator can overwrite the tokens after '=', and keeping them leaves the converter
    lossless, so stripping them (regex `<<[^>]*>>`) stays a separate, visible choice rather
    than one baked into every derived dataset. Scoring is unaffected either way: it reads
    only the number after '####'. The cost is a few extra tokens per step and a model
    that writes the annotations in its own answers.
    """
    question, answer = _gsm8k_fields(record, where)
    gsm8k_final_answer(answer, f"{where}: field 'answer'")  # the completion must end in a scoreable answer
    return validate_record(SFTPromptCompletion, {"prompt": question, "completion": answer}, where)


def gsm8k_to_chat(record: dict[str, Any], where: str = "gsm8k record") -> SFTChat:
    """A two-turn chat: the question as the user turn, the worked solution as the assistant turn."""
    example = gsm8k_to_sft(record, where)
    messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
    return validate_record(SFTChat, {"messages": messages}, where)


def gsm8k_to_rl(record: dict[str, Any], where: str = "gsm8k record") -> RLPrompt:
    """Prompt = question; reference_answer = the final number, which a reward function can check."""
    question, answer = _gsm8k_fields(record, where)
    reference = gsm8k_final_answer(answer, f"{where}: field 'answer'")
    return validate_record(RLPrompt, {"prompt": question, "reference_answer": reference}, where)
