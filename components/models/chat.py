"""Chats through a tokenizer's own chat template: the prompt a model is asked with, the ids
that end its turn, and (input_ids, labels) examples whose labels mark only the reply.

Invariant: every conversation a model is trained on, sampled with or scored with is rendered
by its tokenizer's chat template, never by a format of ours.
"""

from __future__ import annotations

import re
from typing import Any

from components.errors import ConfigError, DataError

IGNORE_INDEX = -100  # label value torch's cross-entropy (and transformers' loss) skips
GENERATION_SPAN = re.compile(r"\{%-?\s*generation\s*-?%\}")  # a template's own assistant-token marks

TokenizedExample = tuple[list[int], list[int]]  # (input_ids, labels), same length
Messages = list[dict[str, str]]
Prompt = str | list[dict[str, str]]  # a user message, or a whole chat ending with a user turn


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The chat-templated prompt plus the assistant generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids that end a completion: end of sequence, and ChatML's end of turn where the vocabulary has it."""
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def tokenize_messages(tokenizer: Any, messages: list[dict[str, str]]) -> TokenizedExample:
    """Render with the chat template; keep labels only on the assistant turns.

    A template with `{% generation %}` spans marks the assistant tokens itself: the mask is
    exactly the assistant content plus its end-of-turn token (the model must learn to stop)
    and none of the role headers. Most released models' templates (SmolLM2's, Qwen's,
    Llama's) have no such spans; their assistant turns are found by rendering (`_turn_spans`).
    """
    if GENERATION_SPAN.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        )
        input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    else:
        input_ids, mask = _turn_spans(tokenizer, messages)
    if not any(mask):
        raise DataError("the chat template marked no assistant tokens: the conversation needs an assistant turn "
                        "with content for a completion-only loss")
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
    return input_ids, labels


def _turn_spans(tokenizer: Any, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """The rendered conversation and a mask of its assistant turns, for a template without
    `{% generation %}` spans: turn i starts where `messages[:i]` rendered with the generation
    prompt ends, and ends at its last end-of-turn token (`stop_ids`) within `messages[:i+1]`
    rendered (TRL's prompt-completion masking, applied to every assistant turn). Both
    renderings must be prefixes of the whole one; a template that rewrites earlier turns
    (e.g. one dropping past reasoning) is refused."""
    def render(part: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        return list(tokenizer.apply_chat_template(part, tokenize=True, add_generation_prompt=generation_prompt,
                                                  return_dict=True)["input_ids"])

    input_ids = render(messages, False)
    mask = [0] * len(input_ids)
    stops = set(stop_ids(tokenizer))
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start, through = render(messages[:index], True), render(messages[:index + 1], False)
        if input_ids[:len(start)] != start or input_ids[:len(through)] != through:
            raise DataError(f"the chat template renders the conversation before assistant turn {index} differently "
                            "from the start of the whole conversation, so the turn's tokens cannot be located; "
                            "give the template {% generation %} spans")
        span = range(len(start), len(through))
        ends = [position for position in span if input_ids[position] in stops]
        for position in range(span.start, ends[-1] + 1 if ends else span.stop):
            mask[position] = 1
    return input_ids, mask


def reply_example(tokenizer: Any, prompt: Messages, reply: Messages) -> TokenizedExample:
    """(input_ids, labels) of prompt + reply rendered with the chat template; labels on the
    reply's assistant tokens only.

    The reply starts where the prompt rendered with the generation prompt ends, which must be
    a prefix of the whole rendering (true of any template that renders turns one after
    another); an assistant turn inside the prompt is masked as context.
    """
    prompt_ids = list(tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"])
    input_ids, labels = tokenize_messages(tokenizer, prompt + reply)
    if input_ids[:len(prompt_ids)] != prompt_ids:
        raise DataError("the chat template does not render the prompt (with its generation prompt) as the start of "
                        "prompt + reply, so the reply's tokens cannot be told apart from the prompt's")
    return input_ids, [IGNORE_INDEX] * len(prompt_ids) + labels[len(prompt_ids):]


def chat_example(tokenizer: Any, prompt: str, completion: str) -> TokenizedExample:
    """(input_ids, labels) of a user prompt and assistant completion; labels on the completion only."""
    return reply_example(tokenizer, [{"role": "user", "content": prompt}],
                         [{"role": "assistant", "content": completion}])


def context_tokens(model_config: Any) -> int:
    """The longest sequence a model's positions cover (`max_position_embeddings`; GPT-2: `n_positions`)."""
    return getattr(model_config, "max_position_embeddings", None) or model_config.n_positions


def check_context(prompts: list[list[int]], max_new_tokens: int, context: int, source: str, model: str) -> None:
    """Refuse a prompt whose tokens plus `max_new_tokens` exceed the model's context, naming the
    problem's position in `source`: positions past the context are garbage, not an error, in
    most models' forward."""
    for row, ids in enumerate(prompts, start=1):
        if len(ids) + max_new_tokens > context:
            raise ConfigError(f"{source}: problem {row}'s prompt ({len(ids)} tokens) + max_new_tokens "
                              f"({max_new_tokens}) exceed the context of {model} ({context} tokens)")
