"""Sampling completions from a causal LM: batched, with a KV cache, with token counts and
log-probabilities, optionally with the GSM8K calculator as a tool.

`sample(...)` renders each prompt with the tokenizer's chat template (a user turn and the
generation prompt), left-pads a batch, and decodes with transformers' `generate` (which
keeps a KV cache), `n` samples per prompt. Every sample reports its generated tokens and
the mean log-probability of those tokens under the sampling distribution's model (the
score best-of-n by mean log-prob ranks by).

`sample_with_calculator(...)` decodes token by token with the KV cache and, whenever the
text ends with an open calculator call (`<<48/2=`), appends the evaluated result and `>>`
(components.tasks.calculator), feeds those tokens through the model to extend the cache,
and goes on: the model sees the calculator's answer, never its own guess.

`decode(...)` (the RL trainers' rollouts and held-out scoring) samples with a KV cache: one
prefill per distinct prompt, the cache repeated for the group's samples, then one token per
step for every live row; rows that finished are dropped from the batch and the cache, so
late steps cost only what is still generating. Llama-like models (Llama, Mistral, Qwen2,
Qwen3: `fast_llama.supports`) go through `fast_llama.LlamaSampler` (the same mathematics on the
model's weights, without transformers' per-token overhead); others through their own forward
with a `DynamicCache`.
Sampling draws from torch's global RNG, which the checkpoints save, so a resumed run samples
what the interrupted one would have.

`sample` keeps transformers' `generate` because the evaluators' reported numbers come from
its random stream (it draws for finished rows too); moving them onto `decode` would change
every reported accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from components.errors import ConfigError
from components.models.chat import Prompt, prompt_ids, stop_ids
from components.tasks.calculator import CALL_CLOSE, complete_call, pending_call

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Sample:
    text: str
    generated_tokens: int
    mean_logprob: float | None  # None: not computed (a caller that reads only the text asked not to)
    finished: bool  # ended with the end-of-turn token (not cut at max_new_tokens)
    tool_calls: int = 0
    calculator_calls: tuple[tuple[str, str], ...] = ()  # (expression, inserted result) of each call, in order


def sample(model: Any, tokenizer: Any, prompts: list[Prompt], n: int, max_new_tokens: int, temperature: float = 1.0,
           seed: int = 0, batch_prompts: int = 8, with_logprobs: bool = True) -> list[list[Sample]]:
    """`n` samples for each prompt (greedy when temperature is 0; then n must be 1), each
    with its mean log-prob unless `with_logprobs` is False."""
    import torch

    if n < 1:
        raise ConfigError(f"n must be at least 1, got {n}")
    if temperature == 0 and n > 1:
        raise ConfigError("greedy decoding (temperature 0) gives one sample per prompt; use n=1")
    stops = stop_ids(tokenizer)
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
                num_return_sequences=n, eos_token_id=stops, pad_token_id=pad, output_scores=with_logprobs,
                return_dict_in_generate=True, use_cache=True,
            )
        generated = out.sequences[:, width:]
        scores = (model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
                  if with_logprobs else None)
        for row in range(generated.shape[0]):
            tokens = generated[row].tolist()
            length = next((i + 1 for i, t in enumerate(tokens) if t in stops), None)
            finished = length is not None
            length = length or len(tokens)
            logprob = float(scores[row, :length].sum()) / max(1, length) if scores is not None else None
            text = tokenizer.decode(tokens[:length], skip_special_tokens=True)
            if row % n == 0:
                results.append([])
            results[-1].append(Sample(text=text, generated_tokens=length, mean_logprob=logprob, finished=finished))
    return results


def sample_with_calculator(model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int, temperature: float = 1.0,
                           seed: int = 0) -> Sample:
    """One completion, decoded with the KV cache, the calculator filling in every `<<expr=`."""
    import torch

    stops = set(stop_ids(tokenizer))
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


@dataclass
class Rollout:
    """Prompt (left-padded to `prompt_width`) + completion (right-padded) per row."""

    input_ids: torch.Tensor  # [rows, prompt_width + completion_width]
    attention_mask: torch.Tensor  # same shape; 0 on padding
    completion_mask: torch.Tensor  # [rows, completion_width] float; 1 on sampled tokens (stop token included)
    prompt_width: int
    texts: list[str]
    finished: list[bool]  # ended with a stop token (not cut at max_new_tokens)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def rows(self, index: slice | list[int]) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "attention_mask": self.attention_mask[index],
                "completion_mask": self.completion_mask[index]}


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def decode(model: Any, tokenizer: Any, prompts: list[list[int]], repeats: int, max_new_tokens: int,
           temperature: float) -> Rollout:
    """`repeats` completions per prompt (consecutive rows), sampled at `temperature` (0: greedy)."""
    import torch

    from components.models.fast_llama import LlamaSampler, supports

    stops = torch.tensor(stop_ids(tokenizer))
    pad = tokenizer.pad_token_id
    padded_prompts, prompt_mask = left_pad(prompts, pad)
    width = padded_prompts.shape[1]
    was_training = model.training
    model.eval()
    if supports(model, width + max_new_tokens):
        tokens, lengths, finished = LlamaSampler(model).decode(padded_prompts, prompt_mask, repeats, max_new_tokens,
                                                               temperature, stops, pad)
    else:
        tokens, lengths, finished = _decode_with_transformers(model, padded_prompts, prompt_mask, repeats, max_new_tokens,
                                                              temperature, stops, pad)
    model.train(was_training)
    completion_width = max(1, int(lengths.max()))
    tokens = tokens[:, :completion_width]
    completion_mask = (torch.arange(completion_width)[None, :] < lengths[:, None]).float()
    input_ids = torch.cat([padded_prompts.repeat_interleave(repeats, dim=0), tokens], dim=1)
    attention_mask = torch.cat([prompt_mask.repeat_interleave(repeats, dim=0), completion_mask.long()], dim=1)
    texts = [tokenizer.decode(row[:length].tolist(), skip_special_tokens=True) for row, length in zip(tokens, lengths)]
    return Rollout(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                   prompt_width=width, texts=texts, finished=finished.tolist())


def _decode_with_transformers(model: Any, padded_prompts: torch.Tensor, prompt_mask: torch.Tensor, repeats: int,
                              max_new_tokens: int, temperature: float, stops: torch.Tensor, pad: int
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Any causal LM, through its own forward and a DynamicCache (the same sampling as LlamaSampler)."""
    import torch
    from transformers import DynamicCache

    rows = padded_prompts.shape[0] * repeats
    cache = DynamicCache(config=model.config)
    tokens = torch.full((rows, max_new_tokens), pad, dtype=torch.long)
    lengths = torch.zeros(rows, dtype=torch.long)
    finished = torch.zeros(rows, dtype=torch.bool)
    with torch.no_grad():
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=padded_prompts, attention_mask=prompt_mask, position_ids=positions, cache=cache,
                    use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1].float()
        if repeats > 1:
            cache.batch_repeat_interleave(repeats)
            logits = logits.repeat_interleave(repeats, dim=0)
        mask = prompt_mask.repeat_interleave(repeats, dim=0)
        position = positions[:, -1].repeat_interleave(repeats, dim=0)
        live = torch.arange(rows)  # rows still generating, in cache order
        for step in range(max_new_tokens):
            if temperature > 0:
                token = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1).squeeze(1)
            else:
                token = logits.argmax(dim=-1)
            tokens[live, step] = token
            lengths[live] += 1
            stopped = torch.isin(token, stops)
            finished[live[stopped]] = True
            keep = ~stopped
            if step == max_new_tokens - 1 or not keep.any():
                break
            if not keep.all():
                kept = keep.nonzero().squeeze(1)
                cache.batch_select_indices(kept)
                live, token, mask, position = live[kept], token[kept], mask[kept], position[kept]
            mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype)], dim=1)
            position = position + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None], cache=cache,
                        use_cache=True)
            logits = out.logits[:, -1].float()
    return tokens, lengths, finished


def sample_decoded(model: Any, tokenizer: Any, prompts: list[Prompt], n: int, max_new_tokens: int,
                   temperature: float = 1.0, seed: int = 0, logprob_rows: int = 8, with_logprobs: bool = True
                   ) -> list[list[Sample]]:
    """`sample`'s result through `decode` (the fast path for Llama-like models): `n` samples per
    prompt, all prompts in one batch; each sample's mean log-prob under softmax(logits /
    temperature) comes from one forward over the finished rollout (`logprob_rows` rows at a
    time), as `generate`'s normalised scores give it. That forward costs about as much as the
    decode itself (GSM8K, 100 greedy rows: 44 s against 64 s here), so `with_logprobs=False`
    skips it for callers that read only the text."""
    import torch

    from components.models.logprobs import completion_logprobs

    if temperature == 0 and n > 1:
        raise ConfigError("greedy decoding (temperature 0) gives one sample per prompt; use n=1")
    torch.manual_seed(seed)
    rollout = decode(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], n, max_new_tokens, temperature)
    lengths = rollout.completion_mask.sum(-1)
    means: list[float | None] = [None] * len(rollout.texts)
    if with_logprobs:
        sums = []
        with torch.no_grad():
            for start in range(0, len(rollout.texts), logprob_rows):
                rows = slice(start, start + logprob_rows)
                logprobs, _, _ = completion_logprobs(model, rollout.input_ids[rows], rollout.attention_mask[rows],
                                                     rollout.prompt_width, temperature)
                sums.append((logprobs * rollout.completion_mask[rows]).sum(-1))
        means = [float(total) / max(1, int(length)) for total, length in zip(torch.cat(sums), lengths, strict=True)]
    samples = [Sample(text=text, generated_tokens=int(length), mean_logprob=mean, finished=finished)
               for text, length, mean, finished in zip(rollout.texts, lengths, means, rollout.finished, strict=True)]
    return [samples[i * n:(i + 1) * n] for i in range(len(prompts))]
