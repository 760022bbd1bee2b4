"""Preference pairs from a verifier, pair files and pair tokenization, on real tiny models.

The helpers here (a tokenizer and tiny model, a noisy SFT model, an easy preference set) are
shared by test_reward_model.py and test_dpo.py.
"""

from __future__ import annotations

import json
from collections import Counter
import random
from pathlib import Path

import pytest

from components.data.preferences import (
    PreferencePairsConfig, pair_up, preference_pairs, read_pairs, tokenize_pairs,
)
from components.errors import DataError
from components.models.chat import chat_example
from components.tasks.verifiers import is_correct
from tests.conftest import build_tiny_lm, sft_on_records

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay"]
ITEMS = ["apples", "pens", "books", "coins", "shells"]


def build_base(root: Path) -> Path:
    """The shared tiny tokenizer + untrained Llama (context 256) under root/model."""
    return build_tiny_lm(root, max_positions=256)


def write_sign_pairs(path: Path, count: int, seed: int = 0) -> list[dict[str, str]]:
    """An easy preference set a one-layer model learns in a few dozen steps: addition word
    problems whose chosen completion ends in the right `#### N` and whose rejected one in
    `#### -N` (a count is never negative). Only the final answer differs, and '-' occurs
    nowhere else (the problems only add)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        a, b, name, item = rng.randint(2, 20), rng.randint(2, 20), rng.choice(NAMES), rng.choice(ITEMS)
        work = f"{a} + {b} = {a + b}\n"
        rows.append({"prompt": f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
                     "chosen": f"{work}#### {a + b}", "rejected": f"{work}#### -{a + b}"})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return rows


def five_question(rng: random.Random) -> str:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return f"{name} has 5 {item}. How many {item} does {name} have?"


def write_five_problems(path: Path, count: int, seed: int = 1) -> None:
    """GSM8K-format problems whose answer is always 5."""
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"question": five_question(rng), "answer": "5 items\n#### 5"}) + "\n"
                            for _ in range(count)), encoding="utf-8")


def train_noisy_sft(root: Path, base_model: Path) -> Path:
    """A tiny model fine-tuned (with the real sft_data + sft components) to answer the
    five-problems with `#### 5` 60% of the time and `#### -5` otherwise: a policy whose
    samples are sometimes right and sometimes wrong. Returns its model directory."""
    rng = random.Random(2)
    records = [{"prompt": five_question(rng), "completion": "#### 5" if rng.random() < 0.6 else "#### -5"}
               for _ in range(64)]
    return sft_on_records(root, base_model, records)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_base(tmp_path_factory.mktemp("preferences"))


@pytest.mark.parametrize("sampling", [{}, {"sampler": "decode", "precision": "bf16"}], ids=["generate", "decode-bf16"])
def test_pairs_pair_a_verified_correct_sample_with_an_incorrect_one(base: Path, tmp_path: Path,
                                                                    sampling: dict[str, str]) -> None:
    policy = train_noisy_sft(tmp_path, base)
    write_five_problems(tmp_path / "problems.jsonl", 16)
    config = PreferencePairsConfig(max_problems=12, samples_per_prompt=4, pairs_per_prompt=2, max_new_tokens=8,
                                   **sampling)
    metrics = preference_pairs(config, str(policy), str(tmp_path / "problems.jsonl"), str(tmp_path / "pairs")).metrics
    rows = [json.loads(line) for line in (tmp_path / "pairs/pairs.jsonl").read_text().splitlines()]
    questions = {json.loads(line)["question"] for line in (tmp_path / "problems.jsonl").read_text().splitlines()}

    assert metrics["problems"] == 12 and metrics["samples"] == 48
    assert 0 < metrics["sample_accuracy"] < 1  # the noisy policy is sometimes right, sometimes wrong
    assert metrics["prompts_with_pairs"] + metrics["prompts_all_correct"] + metrics["prompts_all_wrong"] == 12
    assert metrics["prompts_with_pairs"] >= 3 and metrics["pairs"] == len(rows)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "reference"} and row["prompt"] in questions
        assert is_correct(row["chosen"], row["reference"]) and not is_correct(row["rejected"], row["reference"])
    per_prompt: dict[str, list[tuple[str, str]]] = {}
    for row in rows:
        per_prompt.setdefault(row["prompt"], []).append((row["chosen"], row["rejected"]))
    asked = Counter(json.loads(line)["question"] for line in (tmp_path / "problems.jsonl").read_text().splitlines()[:12])
    for prompt, pairs in per_prompt.items():  # at most pairs_per_prompt per problem (a question may repeat)
        assert len(pairs) <= 2 * asked[prompt]
        assert asked[prompt] > 1 or len(set(pairs)) == len(pairs)  # one problem's pairs are distinct
    assert read_pairs(tmp_path / "pairs").pairs[0].chosen == rows[0]["chosen"]  # the artifact reads back

    again = preference_pairs(config, str(policy), str(tmp_path / "problems.jsonl"), str(tmp_path / "pairs2")).metrics
    assert again == metrics  # seeded: the same samples, the same pairs
    assert (tmp_path / "pairs2/pairs.jsonl").read_bytes() == (tmp_path / "pairs/pairs.jsonl").read_bytes()


def test_a_policy_that_is_always_wrong_makes_no_pairs_and_publishes_nothing(base: Path, tmp_path: Path) -> None:
    write_five_problems(tmp_path / "problems.jsonl", 3)
    config = PreferencePairsConfig(samples_per_prompt=2, max_new_tokens=4)
    with pytest.raises(DataError, match=r"problems.jsonl: no preference pair from 3 problems "
                                        r"\(0 all correct, 3 all wrong\)"):
        preference_pairs(config, str(base), str(tmp_path / "problems.jsonl"), str(tmp_path / "pairs"))
    assert not (tmp_path / "pairs").exists()


def test_pair_up_draws_distinct_pairs_and_never_blank_texts() -> None:
    pairs = pair_up(["a", "a", "b"], ["x", " ", "y", "x"], limit=10, rng=random.Random(0))
    assert sorted(pairs) == [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y")]
    assert len(pair_up(["a", "b"], ["x", "y"], limit=3, rng=random.Random(0))) == 3
    assert pair_up(["a"], [""], limit=2, rng=random.Random(0)) == []


def test_bad_pair_files_are_named_and_identical_pairs_never_train(tmp_path: Path) -> None:
    good = {"prompt": "2+2?", "chosen": "#### 4", "rejected": "#### 5"}
    missing = tmp_path / "missing.jsonl"
    missing.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "1+1?", "chosen": "#### 2"}) + "\n")
    with pytest.raises(DataError, match=r"missing.jsonl:2: missing field\(s\) \['rejected'\] of a preference pair "
                                        r"\(record has \['chosen', 'prompt'\]\)"):
        read_pairs(missing)
    blank = tmp_path / "blank.jsonl"
    blank.write_text(json.dumps({**good, "chosen": "  "}) + "\n")
    with pytest.raises(DataError, match=r"blank.jsonl:1: field 'chosen': must not be empty"):
        read_pairs(blank)
    not_text = tmp_path / "not_text.jsonl"
    not_text.write_text(json.dumps({**good, "rejected": 5}) + "\n")
    with pytest.raises(DataError, match=r"not_text.jsonl:1: field 'rejected'"):
        read_pairs(not_text)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(DataError, match=r"broken.jsonl:2: malformed JSON"):
        read_pairs(broken)

    same = tmp_path / "same.jsonl"
    rows = [good, {**good, "rejected": "#### 4 "}, {**good, "extra": 1}]
    same.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    read = read_pairs(same)
    assert read.identical_skipped == 1 and read.lines == [1, 3] and len(read.pairs) == 2  # extra fields are ignored
    with pytest.raises(DataError, match=r"same.jsonl:2: 'chosen' and 'rejected' are identical"):
        read_pairs(same, strict=True)
    only_same = tmp_path / "only_same.jsonl"
    only_same.write_text(json.dumps({**good, "rejected": "#### 4"}) + "\n")
    with pytest.raises(DataError, match=r"only_same.jsonl: no preference pairs \(1 identical pairs skipped\)"):
        read_pairs(only_same)
    with pytest.raises(DataError, match=r"no pairs.jsonl"):
        read_pairs(tmp_path)  # a directory that is not a preference_pairs artifact


def test_tokenized_pairs_train_on_the_completion_only_and_count_truncation(base: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    write_sign_pairs(tmp_path / "pairs.jsonl", 6)
    pairs = read_pairs(tmp_path / "pairs.jsonl").pairs
    tokenized = tokenize_pairs(tokenizer, pairs, 256, "pairs")
    columns = tokenized.columns
    assert tokenized.stats["pairs"] == 6 and tokenized.stats["truncated_pairs"] == 0
    assert tokenized.kept == list(range(6))
    assert {name: tuple(t.shape) for name, t in columns.items()} == {
        name: (6, tokenized.stats["width_tokens"]) for name in columns}  # both sides padded to one width
    for row, pair in enumerate(pairs):
        for side in ("chosen", "rejected"):
            labels = columns[f"{side}_labels"][row]
            assert tokenizer.decode(labels[labels != -100]) == getattr(pair, side) + "<|im_end|>"
            ids = columns[f"{side}_input_ids"][row]
            real = int((ids != tokenizer.pad_token_id).sum())
            assert ids[:real].tolist() == chat_example(tokenizer, pair.prompt, getattr(pair, side))[0]
            assert torch.all(labels[real:] == -100)

    chosen_ids = chat_example(tokenizer, pairs[0].prompt, pairs[0].chosen)[0]
    rejected_ids = chat_example(tokenizer, pairs[0].prompt, pairs[0].rejected)[0]
    first_difference = next(i for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids)) if c != r)
    cut = tokenize_pairs(tokenizer, pairs[:1] + pairs[:1], first_difference + 1, "pairs")  # keeps one differing token
    assert cut.stats["truncated_pairs"] == 2 and cut.stats["width_tokens"] == first_difference + 1
    assert cut.stats["truncated_tokens"] == 2 * (len(chosen_ids) + len(rejected_ids) - 2 * (first_difference + 1))
    with pytest.raises(DataError, match=r"no preference pair is left to train on at max_length_tokens=\d+ "
                                        r"\(0 lost their completion tokens, 1 became identical\)"):
        tokenize_pairs(tokenizer, pairs[:1], first_difference, "pairs")  # the sides agree up to the cut
    prompt_tokens = next(i for i, label in enumerate(chat_example(tokenizer, pairs[0].prompt, pairs[0].chosen)[1])
                         if label != -100)
    with pytest.raises(DataError, match=r"1 lost their completion tokens"):
        tokenize_pairs(tokenizer, pairs[:1], prompt_tokens, "pairs")


# --------------------------------------------------------------------------- TRL's conversational formats


def _as_conversational(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A standard row in TRL's conversational preference format (explicit prompt)."""
    return {"prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def _as_implicit(row: dict[str, str]) -> dict[str, list[dict[str, str]]]:
    """A standard row in TRL's conversational format with an implicit prompt (whole conversations)."""
    user = {"role": "user", "content": row["prompt"]}
    return {"chosen": [user, {"role": "assistant", "content": row["chosen"]}],
            "rejected": [user, {"role": "assistant", "content": row["rejected"]}]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_trl_standard_and_conversational_files_tokenize_to_the_same_rows(base: Path, tmp_path: Path) -> None:
    """The same pairs in TRL's standard, conversational and implicit-prompt conversational
    formats give identical training rows, and those rows are the chat template's rendering."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    rows = write_sign_pairs(tmp_path / "standard.jsonl", 5)
    _write(tmp_path / "conversational.jsonl", [_as_conversational(row) for row in rows])
    _write(tmp_path / "implicit.jsonl", [_as_implicit(row) for row in rows])
    tokenized = {name: tokenize_pairs(tokenizer, read_pairs(tmp_path / f"{name}.jsonl").pairs, 256, name)
                 for name in ("standard", "conversational", "implicit")}
    for name in ("conversational", "implicit"):
        assert tokenized[name].stats == tokenized["standard"].stats
        for column, tensor in tokenized["standard"].columns.items():
            assert torch.equal(tokenized[name].columns[column], tensor), (name, column)

    pair = read_pairs(tmp_path / "implicit.jsonl").pairs[0]  # the implicit prompt is the shared user turn
    assert [m.model_dump() for m in pair.prompt] == [{"role": "user", "content": rows[0]["prompt"]}]
    columns = tokenized["conversational"].columns
    for side in ("chosen", "rejected"):
        messages = [{"role": "user", "content": rows[0]["prompt"]}, {"role": "assistant", "content": rows[0][side]}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        ids, labels = columns[f"{side}_input_ids"][0], columns[f"{side}_labels"][0]
        assert ids[:len(rendered)].tolist() == list(rendered)
        assert tokenizer.decode(labels[labels != -100]) == rows[0][side] + "<|im_end|>"


def test_a_multi_turn_prompt_is_context_and_only_the_reply_is_trained(base: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    history = [{"role": "system", "content": "Answer with #### and a number."},
               {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "#### 4"},
               {"role": "user", "content": "And 3+3?"}]
    explicit = {"prompt": history, "chosen": [{"role": "assistant", "content": "#### 6"}],
                "rejected": [{"role": "assistant", "content": "#### 7"}]}
    implicit = {"chosen": history + explicit["chosen"], "rejected": history + explicit["rejected"]}
    for name, row in (("explicit", explicit), ("implicit", implicit)):
        [pair] = read_pairs(_write(tmp_path / f"{name}.jsonl", [row])).pairs
        assert [m.content for m in pair.prompt] == [m["content"] for m in history]
        columns = tokenize_pairs(tokenizer, [pair], 256, name).columns
        prompt_ids = tokenizer.apply_chat_template(history, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        for side, answer in (("chosen", "#### 6"), ("rejected", "#### 7")):
            ids, labels = columns[f"{side}_input_ids"][0], columns[f"{side}_labels"][0]
            assert ids[:len(prompt_ids)].tolist() == list(prompt_ids)  # the prompt rendered with its generation prompt
            assert (labels[:len(prompt_ids)] == -100).all()  # the earlier "#### 4" turn is not trained on
            assert tokenizer.decode(labels[labels != -100]) == answer + "<|im_end|>"


def test_a_conversational_pairs_file_publishes_a_dpo_reference(base: Path, tmp_path: Path) -> None:
    """Through a real trainer's reader: dpo_reference on the conversational file caches the same
    token rows and log-probs as on the standard file, and stores the messages as JSON."""
    import pyarrow.parquet as pq

    from components.train.dpo import REFERENCE_DATA, DPOReferenceConfig, dpo_reference

    rows = write_sign_pairs(tmp_path / "standard.jsonl", 4)
    _write(tmp_path / "conversational.jsonl", [_as_conversational(row) for row in rows])
    tables = {}
    for name in ("standard", "conversational"):
        dpo_reference(DPOReferenceConfig(max_length_tokens=128), str(tmp_path / f"{name}.jsonl"), str(base),
                      str(tmp_path / f"ref_{name}"))
        tables[name] = pq.read_table(tmp_path / f"ref_{name}" / REFERENCE_DATA).to_pydict()
    for column in ("chosen_input_ids", "chosen_labels", "rejected_labels", "ref_chosen_logps", "ref_rejected_logps"):
        assert tables["conversational"][column] == tables["standard"][column], column
    assert [json.loads(text) for text in tables["conversational"]["chosen"]] == \
        [_as_conversational(row)["chosen"] for row in rows]
    assert tables["standard"]["chosen"] == [row["chosen"] for row in rows]


@pytest.mark.parametrize(("row", "expected"), [
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "bot", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, r"field 'chosen\.0\.role': Input should be 'system'"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant"}]}, r"field 'rejected\.0\.content': Field required"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": "b"}, r"field\(s\) \['rejected'\] hold text but \['prompt', 'chosen'\] hold message lists"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"field 'prompt': must end with a user turn \(ends with assistant\)"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]},
     r"field 'chosen': must start with an assistant turn \(starts with user\)"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other q"}, {"role": "assistant", "content": "b"}]},
     r"\(implicit prompt: the 0 leading messages 'chosen' and 'rejected' share\): field 'prompt': must end with a "
     r"user turn \(ends with nothing\)"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "q"}]},
     r"\(implicit prompt: the 1 leading messages .*field 'rejected': must start with an assistant turn "
     r"\(starts with nothing\)"),
    ({"chosen": "q a", "rejected": "q b"},
     r"missing field\(s\) \['prompt'\] .*only conversational rows \(message lists\) may leave the prompt implicit"),
])
def test_a_malformed_conversational_row_names_file_line_and_field(tmp_path: Path, row: dict, expected: str) -> None:
    good = _as_conversational({"prompt": "2+2?", "chosen": "#### 4", "rejected": "#### 5"})
    path = _write(tmp_path / "pairs.jsonl", [good, good, row])
    with pytest.raises(DataError, match=r"pairs\.jsonl:3:? " + expected):
        read_pairs(path)


def test_identical_conversational_replies_are_skipped_or_refused(tmp_path: Path) -> None:
    good = _as_conversational({"prompt": "2+2?", "chosen": "#### 4", "rejected": "#### 5"})
    same = {**good, "rejected": [{"role": "assistant", "content": " #### 4 "}]}
    implicit_same = {"chosen": good["prompt"] + good["chosen"], "rejected": good["prompt"] + good["chosen"]}
    path = _write(tmp_path / "pairs.jsonl", [good, same, implicit_same])
    read = read_pairs(path)
    assert read.identical_skipped == 2 and read.lines == [1]
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: 'chosen' and 'rejected' are identical"):
        read_pairs(path, strict=True)
