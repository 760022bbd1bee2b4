"""Chats through a tokenizer's own chat template: the prompt a model is asked with, the ids
that end its turn, and (input_ids, labels) examples whose labels mark only the reply.

Invariant: every conversation a model is trained on, sampled with or scored with is rendered
by its tokenizer's chat template, never by a format of ours.
"""

from __future__ import annotations

from typing import Any

from components.errors import DataError

IGNORE_INDEX = -100  # label value torch's cross-entropy (and transformers' loss) skips

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
    """Render with the chat template; keep labels only where the template marks assistant text.

    The mask comes from the template's `{% generation %}` spans, so it covers exactly the
    assistant content plus its end-of-turn token (the model must learn to stop) and none of
    the role headers.
    """
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
    )
    input_ids = list(out["input_ids"])
    mask = out["assistant_masks"]
    if not any(mask):
        raise DataError(
            "the tokenizer's chat template marked no assistant tokens; it must wrap assistant "
            "turns in {% generation %} ... {% endgeneration %} for a completion-only loss"
        )
    labels = [token if keep else IGNORE_INDEX for token, keep in zip(input_ids, mask, strict=True)]
    return input_ids, labels


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
