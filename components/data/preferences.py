"""Preference pairs: built from a verifiable task by sampling and verifying, or read from a
user's file, and tokenized into the padded columns the preference trainers train on.

- `preference_pairs` (component): for each problem (GSM8K fields question/answer, e.g. the
  arithmetic task's `train.jsonl`) sample n completions from the model, verify each against
  the reference answer, and pair a correct completion (chosen) with an incorrect one
  (rejected) of the same prompt, up to `pairs_per_prompt` distinct pairs. This is how
  preference data is made from a verifier rather than from human labels (Pang et al. 2024,
  "Iterative Reasoning Preference Optimization", §2.1: correct vs incorrect chains of thought
  sampled from the current model). Prompts whose samples are all correct give no pair;
  all-wrong prompts give none either, unless `reference_when_all_wrong` pairs the problem's
  reference solution (chosen) with a wrong sample (as RPO/SPIN-style pipelines use gold
  answers); both are counted; blank completions are counted and never paired (the pair format
  refuses empty text), and completions cut at `max_new_tokens` are counted but verified as
  they are.
- `read_pairs`: a pairs file in TRL's preference formats ("Dataset formats" in TRL's docs), one
  JSON object per line (other fields are ignored):
  - standard: `prompt`, `chosen`, `rejected` as text;
  - conversational: each a list of `{role, content}` messages, the prompt ending with a user
    turn and each reply starting with the assistant's;
  - conversational with an implicit prompt: only `chosen` and `rejected`, whole conversations;
    the messages they share from the start are the prompt (TRL's `extract_prompt`).
  A standard row needs its `prompt` (splitting text at the first differing character would cut
  words). A bad row is a DataError naming file:line and field; a row mixing text and message
  lists is refused. A pair whose chosen equals its rejected carries no preference, so it is
  skipped and counted, or refused with its file:line when `strict`.
- `tokenize_pairs`: each side rendered with the tokenizer's chat template as the prompt's
  messages (a standard prompt is one user turn) followed by the reply (a standard completion
  is one assistant turn). Labels keep the reply's assistant tokens only (the template's
  assistant span, end of turn included), -100 elsewhere, so an assistant turn inside a
  multi-turn prompt is context, not trained on, as in TRL's preference trainers. Both sides
  are padded to one width so a trainer can run chosen and rejected through the model as one
  batch. Longer rows are cut at the end and counted; a pair left without completion tokens,
  or with equal sides after the cut, is dropped and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.data.formats import (
    ChatPreferencePair, ImplicitChatPreferencePair, PreferencePair, split_implicit_prompt, validate_record,
)
from components.models.precision import precision_autocast
from components.records import iter_records
from components.models.chat import IGNORE_INDEX, Messages, TokenizedExample, reply_example
from components.errors import DataError

if TYPE_CHECKING:
    import torch

SPEC = ComponentSpec(name="preference_pairs", version="1")
PAIRS_FILE = "pairs.jsonl"
PAIR_FIELDS = ("prompt", "chosen", "rejected")
PAIR_COLUMNS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")
AnyPair = PreferencePair | ChatPreferencePair


class PreferencePairsConfig(StrictConfig):
    max_problems: int = Field(512, gt=0, description="Use the first N problems.")
    samples_per_prompt: int = Field(8, ge=2, description="n completions sampled per problem.")
    pairs_per_prompt: int = Field(1, ge=1, description="Most (chosen, rejected) pairs kept per problem.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (diversity makes pairs).")
    max_new_tokens: int = Field(256, gt=0)
    batch_prompts: int = Field(8, gt=0, description="Problems per generation batch.")
    reference_when_all_wrong: bool = Field(
        False, description="When no sample of a problem is correct, pair its reference solution (chosen) with a "
                           "wrong sample (rejected) instead of skipping the problem.")
    sampler: Literal["generate", "decode"] = Field(
        "generate", description="generate: transformers' generate; decode: the batched KV-cache sampler "
                                "(`models.sampling.decode`, fast for Llama-like models). The pairs use only the texts.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: sample under bf16 autocast (weights stay fp32).")
    seed: int = 0


# --------------------------------------------------------------------------- reading


def pairs_file(path: Path) -> Path:
    """The pairs of a `preference_pairs` artifact (its pairs.jsonl), or a pairs file itself."""
    if path.is_dir():
        inner = path / PAIRS_FILE
        if not inner.is_file():
            raise DataError(f"{path}: no {PAIRS_FILE} (expected a preference_pairs artifact or a .jsonl pairs file)")
        return inner
    return path


@dataclass(frozen=True)
class ReadPairs:
    pairs: list[AnyPair]
    lines: list[int]  # the file line of each pair
    identical_skipped: int  # rows whose chosen equals rejected (after stripping whitespace)


def pair_fields(record: dict[str, Any], where: str) -> dict[str, Any]:
    """The pair fields of a row, after checking that none is missing for its format and that it
    does not mix text with message lists (TRL reads a row as one format or the other)."""
    lists = [name for name in PAIR_FIELDS if isinstance(record.get(name), list)]
    required = ("chosen", "rejected") if lists else PAIR_FIELDS
    missing = [name for name in required if name not in record]
    if missing:
        hint = "" if lists or missing != ["prompt"] else (
            "; only conversational rows (message lists) may leave the prompt implicit")
        raise DataError(f"{where}: missing field(s) {missing} of a preference pair (record has {sorted(record)}){hint}")
    texts = [name for name in PAIR_FIELDS if isinstance(record.get(name), str)]
    if lists and texts:
        raise DataError(f"{where}: field(s) {texts} hold text but {lists} hold message lists: a preference pair is "
                        "all text (TRL's standard format) or all lists of {role, content} messages (conversational)")
    return {name: record[name] for name in PAIR_FIELDS if name in record}


def _normalized(reply: Any) -> Any:
    """Text, or (role, content) per message, with surrounding whitespace stripped; None for
    anything malformed (left to validation to name)."""
    if isinstance(reply, str):
        return reply.strip()
    if isinstance(reply, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in reply):
        return [(m.get("role"), m["content"].strip()) for m in reply]
    return None


def same_replies(fields: dict[str, Any]) -> bool:
    """Whether chosen equals rejected up to surrounding whitespace: the pair states no preference."""
    chosen = _normalized(fields["chosen"])
    return chosen is not None and chosen == _normalized(fields["rejected"])


def parse_pair(fields: dict[str, Any], where: str) -> AnyPair:
    """The validated pair of a row's fields (see `pair_fields`), in whichever TRL format it is."""
    if any(isinstance(value, list) for value in fields.values()):
        if "prompt" not in fields:
            return split_implicit_prompt(validate_record(ImplicitChatPreferencePair, fields, where), where)
        return validate_record(ChatPreferencePair, fields, where)
    return validate_record(PreferencePair, fields, where)


def read_pairs(path: Path, strict: bool = False) -> ReadPairs:
    """Every pair of a pairs file (or artifact); see the module doc for what is refused."""
    source = pairs_file(path)
    pairs, lines, identical = [], [], 0
    for line, record in iter_records(source):
        if isinstance(record, DataError):
            raise record
        fields = pair_fields(record, f"{source}:{line}")
        if same_replies(fields):
            if strict:
                raise DataError(f"{source}:{line}: 'chosen' and 'rejected' are identical: the pair states no "
                                "preference (drop the row, or read with strict off to skip such rows)")
            identical += 1
            continue
        pairs.append(parse_pair(fields, f"{source}:{line}"))
        lines.append(line)
    if not pairs:
        skipped = f" ({identical} identical pairs skipped)" if identical else ""
        raise DataError(f"{source}: no preference pairs{skipped}")
    return ReadPairs(pairs=pairs, lines=lines, identical_skipped=identical)


# --------------------------------------------------------------------------- tokenizing


def pair_messages(pair: AnyPair) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) as chat messages: a standard pair's prompt is one user turn and
    each completion one assistant turn, as TRL renders standard data for a chat model."""
    if isinstance(pair, PreferencePair):
        return ([{"role": "user", "content": pair.prompt}], [{"role": "assistant", "content": pair.chosen}],
                [{"role": "assistant", "content": pair.rejected}])
    prompt, chosen, rejected = ([message.model_dump() for message in messages]
                                for messages in (pair.prompt, pair.chosen, pair.rejected))
    return prompt, chosen, rejected


def pair_text(pair: AnyPair, name: str) -> str:
    """A pair's `prompt`, `chosen` or `rejected` as one string: the text itself, or a
    conversational field's messages as JSON (lossless, so a stored pair can be read back)."""
    value = getattr(pair, name)
    return value if isinstance(value, str) else json.dumps([message.model_dump() for message in value])


@dataclass
class TokenizedPairs:
    columns: dict[str, torch.Tensor]  # PAIR_COLUMNS, each [pairs, width_tokens]
    kept: list[int]  # index into the input pairs of each row
    stats: dict[str, int]


def _has_completion_tokens(labels: list[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels[1:])  # the first position predicts nothing


def tokenize_pairs(tokenizer: Any, pairs: list[AnyPair], max_length_tokens: int, source: str) -> TokenizedPairs:
    """Padded chosen/rejected columns of `pairs` (see the module doc); `source` names the data in errors."""
    import torch

    rows: list[tuple[TokenizedExample, TokenizedExample]] = []
    kept: list[int] = []
    truncated = truncated_tokens = no_completion = identical = 0
    for index, pair in enumerate(pairs):
        sides, cut = [], False
        prompt, chosen, rejected = pair_messages(pair)
        for reply in (chosen, rejected):
            try:
                ids, labels = reply_example(tokenizer, prompt, reply)
            except DataError as error:
                raise DataError(f"{source}: pair {index + 1}: {error}") from None
            if len(ids) > max_length_tokens:  # keep the start: the prompt and the completion's beginning
                cut = True
                truncated_tokens += len(ids) - max_length_tokens
                ids, labels = ids[:max_length_tokens], labels[:max_length_tokens]
            sides.append((ids, labels))
        truncated += cut
        (chosen_ids, chosen_labels), (rejected_ids, rejected_labels) = sides
        if not (_has_completion_tokens(chosen_labels) and _has_completion_tokens(rejected_labels)):
            no_completion += 1
            continue
        if chosen_ids == rejected_ids:
            identical += 1
            continue
        rows.append(((chosen_ids, chosen_labels), (rejected_ids, rejected_labels)))
        kept.append(index)
    if not rows:
        raise DataError(f"{source}: no preference pair is left to train on at max_length_tokens={max_length_tokens} "
                        f"({no_completion} lost their completion tokens, {identical} became identical)")
    pad = tokenizer.pad_token_id
    if pad is None:
        raise DataError(f"{source}: the tokenizer has no pad token")
    width = max(len(ids) for pair in rows for ids, _ in pair)
    columns: dict[str, list[list[int]]] = {name: [] for name in PAIR_COLUMNS}
    for side_index, side in enumerate(("chosen", "rejected")):
        for pair in rows:
            ids, labels = pair[side_index]
            columns[f"{side}_input_ids"].append(ids + [pad] * (width - len(ids)))
            columns[f"{side}_labels"].append(labels + [IGNORE_INDEX] * (width - len(labels)))
    real_tokens = sum(len(ids) for pair in rows for ids, _ in pair)
    stats = {"pairs": len(rows), "truncated_pairs": truncated, "truncated_tokens": truncated_tokens,
             "dropped_no_completion_tokens": no_completion, "dropped_identical_after_truncation": identical,
             "width_tokens": width, "padding_tokens": 2 * len(rows) * width - real_tokens}
    return TokenizedPairs(columns={name: torch.tensor(values, dtype=torch.long) for name, values in columns.items()},
                          kept=kept, stats=stats)


# --------------------------------------------------------------------------- building from a verifier


def pair_up(correct: list[str], wrong: list[str], limit: int, rng: random.Random) -> list[tuple[str, str]]:
    """Up to `limit` distinct (chosen, rejected) pairs of distinct texts, drawn without
    replacement from correct x wrong (seeded); blank texts are never used."""
    chosen = list(dict.fromkeys(text for text in correct if text.strip()))
    rejected = list(dict.fromkeys(text for text in wrong if text.strip()))
    candidates = list(product(chosen, rejected))
    return rng.sample(candidates, min(limit, len(candidates)))


def _build(config: PreferencePairsConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from components.tasks.problems import read_problems
    from components.models.sampling import sample, sample_decoded
    from components.tasks.verifiers import is_correct
    from components.models.factory import load_causal_lm

    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = load_causal_lm(paths["model"]).eval()
    problems = read_problems(paths["problems"], "gsm8k", config.max_problems)
    counts = {"samples": 0, "correct_samples": 0, "blank_samples": 0, "unfinished_samples": 0,
              "prompts_with_pairs": 0, "prompts_all_correct": 0, "prompts_all_wrong": 0, "reference_pairs": 0,
              "pairs": 0}
    draw = sample_decoded if config.sampler == "decode" else sample
    with (open(out_dir / PAIRS_FILE, "w", encoding="utf-8") as sink,
          precision_autocast("cpu", config.precision)):
        for start in range(0, len(problems), config.batch_prompts):
            batch = problems[start:start + config.batch_prompts]
            pools = draw(model, tokenizer, [question for question, _ in batch], n=config.samples_per_prompt,
                         max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                         seed=config.seed + start, with_logprobs=False)
            for (question, reference), pool in zip(batch, pools, strict=True):
                verdicts = [is_correct(s.text, reference) for s in pool]
                counts["samples"] += len(pool)
                counts["correct_samples"] += sum(verdicts)
                counts["blank_samples"] += sum(not s.text.strip() for s in pool)
                counts["unfinished_samples"] += sum(not s.finished for s in pool)
                correct = [s.text for s, ok in zip(pool, verdicts) if ok]
                wrong = [s.text for s, ok in zip(pool, verdicts) if not ok and s.text.strip()]
                if not correct:
                    counts["prompts_all_wrong"] += 1
                    if not (config.reference_when_all_wrong and wrong):
                        continue
                    correct = [reference]
                    counts["reference_pairs"] += 1
                if not wrong:
                    counts["prompts_all_correct"] += 1
                    continue
                counts["prompts_with_pairs"] += 1
                for chosen, rejected in pair_up(correct, wrong, config.pairs_per_prompt, rng):
                    sink.write(json.dumps({"prompt": question, "chosen": chosen, "rejected": rejected,
                                           "reference": reference}) + "\n")
                    counts["pairs"] += 1
    if counts["pairs"] == 0:
        raise DataError(f"{paths['problems']}: no preference pair from {len(problems)} problems "
                        f"({counts['prompts_all_correct']} all correct, {counts['prompts_all_wrong']} all wrong); "
                        "sample more per prompt or at a higher temperature")
    return {"problems": len(problems), **counts, "sample_accuracy": counts["correct_samples"] / counts["samples"]}


def preference_pairs(config: PreferencePairsConfig, model: str, problems: str, dest: str,
                     overwrite: bool = False) -> Manifest:
    """Sample, verify and pair completions of `model` on `problems` into `dest/pairs.jsonl`."""
    from components.locks import exclusive  # sampling seeds the process-wide RNG, as training does

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        with exclusive():
            return _build(config, paths, out_dir)

    return produce(SPEC, config, {"model": model, "problems": problems}, dest, build, overwrite=overwrite)
