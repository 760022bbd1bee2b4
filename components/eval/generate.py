"""Sampling completions from a causal LM: batched, with a KV cache, with token counts and
log-probabilities, optionally with the GSM8K calculator as a tool.

`sample(...)` renders each prompt with the tokenizer's chat template (a user turn and the
generation prompt), left-pads a batch, and decodes with transformers' `generate` (which
keeps a KV cache), `n` samples per prompt. Every sample reports its generated tokens and
the mean log-probability of those tokens under the sampling distribution's model (the
score best-of-n by mean log-prob ranks by).

`sample_with_calculator(...)` decodes token by token with the KV cache and, whenever the
text ends with an open calculator call (`<<48/2=`), appends the evaluated result and `>>`
(components.eval.calculator), feeds those tokens through the model to extend the cache,
and goes on: the model sees the calculator's answer, never its own guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.errors import ConfigError
from components.eval.calculator import CALL_CLOSE, complete_call, pending_call

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sample:
    text: str
    generated_tokens: int
    mean_logprob: float
    finished: bool  # ended with the end-of-turn token (not cut at max_new_tokens)
    tool_calls: int = 0
    calculator_calls: tuple[tuple[str, str], ...] = ()  # (expression, inserted result) of each call, in order


Prompt = str | list[dict[str, str]]  # a user message, or a whole chat ending with a user turn


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The chat-templated prompt plus the assistant generation prompt."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"])


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(end_of_turn, int) and end_of_turn != tokenizer.unk_token_id:
        ids.add(end_of_turn)
    return sorted(i for i in ids if i is not None)


def sample(model: Any, tokenizer: Any, prompts: list[Prompt], n: int, max_new_tokens: int, temperature: float = 1.0,
           seed: int = 0, batch_prompts: int = 8) -> list[list[Sample]]:
    """`n` samples for each prompt (greedy when temperature is 0; then n must be 1)."""
    import torch

    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if temperature == 0 and n > 1:
        raise ConfigError("greedy decoding (temperature 0) gives one sample per prompt; use n=1")
    stops = _stop_ids(tokenizer)
    pad = tokenizer.pad_token_id
    torch.manual_seed(seed)
    results: list[list[Sample]] = []
    model.eval()
    for start in range(0, len(prompts), batch_prompts):
        encoded = [prompt_ids(tokenizer, p) for p in prompts[start:start + batch_prompts]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
        attention_mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(ids) for ids in encoded])[:, None]).long()
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                num_return_sequences=n, eos_token_id=stops, pad_token_id=pad, output_scores=True,
                return_dict_in_generate=True, use_cache=True,
            )
        generated = out.sequences[:, width:]
        scores = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
        for row in range(generated.shape[0]):
            tokens = generated[row].tolist()
            length = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
            finished = length is not None
            length = length or len(tokens)
            logprob = float(scores[row, :length].sum()) / max(1, length)
            text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
            if row % n == 0:
                results.append([])
            results[-1].append(Sample(text=text, generated_tokens=length, mean_logprob=logprob, finished=finished))
    return results


def sample_with_calculator(model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int, temperature: float = 1.0,
                           seed: int = 0) -> Sample:
    """One completion, decoded with the KV cache, the calculator filling in every `<<expr=`."""
    import torch

    stops = set(_stop_ids(tokenizer))
    generator = torch.Generator().manual_seed(seed)
    model.eval()
    ids = torch.tensor([prompt_ids(tokenizer, prompt)])
    generated: list[int] = []
    logprob_sum, sampled, finished = 0.0, 0, False
    calls: list[tuple[str, str]] = []
    cache = None
    feed = ids
    with torch.no_grad():
        while sampled < max_new_tokens:
            out = model(input_ids=feed, cache=cache, use_cache=True)
            cache = out.cache
            logits = out.logits[0, -1].float()
            logprobs = torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)
            if temperature > 0:
                token = int(torch.multinomial(logprobs.exp(), 1, generator=generator))
            else:
                token = int(logits.argmax())
            logprob_sum += float(logprobs[token])
            sampled += 1
            generated.append(token)
            if token in stops:
                finished = True
                break
            feed = torch.tensor([[token]])
            so_far = tokenizer.decode(generated, skip_special_tokens=True)
            insert = complete_call(so_far)
            if insert is not None:  # the calculator's tokens go through the model; they are not sampled
                inserted = tokenizer(insert, add_special_tokens=False)["input_ids"]
                generated.extend(inserted)
                feed = torch.tensor([[token, *inserted]])
                calls.append((pending_call(so_far), insert.removesuffix(CALL_CLOSE)))
    text = tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True)
    return Sample(text=text, generated_tokens=sampled, mean_logprob=logprob_sum / max(1, sampled), finished=finished,
                  tool_calls=len(calls), calculator_calls=tuple(calls))
