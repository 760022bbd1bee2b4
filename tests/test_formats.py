"""Dataset record formats, GSM8K converters, and SFT tokenization/packing on concrete inputs."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.artifacts import ComponentSpec, produce
from components.config import StrictConfig
from components.data.formats import (
    FORMATS,
    SFTChat,
    SFTPromptCompletion,
    gsm8k_to_chat,
    gsm8k_to_rl,
    gsm8k_to_sft,
    validate_records,
)
from components.data.sft_pack import (
    SFTPackConfig,
    block_diagonal_mask,
    document_boundaries,
    pack_sft,
    tokenize_chat,
    tokenize_prompt_completion,
)
from components.models.chat import IGNORE_INDEX
from components.records import read_jsonl, write_shards
from components.tasks.problems import gsm8k_final_answer
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from components.errors import ConfigError, DataError

GSM8K_TRAIN = Path(__file__).resolve().parent.parent / "data/raw/gsm8k/train.jsonl"


def gsm8k_rows(count: int) -> list[dict]:
    return [record for _, record in itertools.islice(read_jsonl(GSM8K_TRAIN), count)]


# --- formats --------------------------------------------------------------------------

GOOD_RECORDS = {
    "pretrain": {"text": "Some text."},
    "sft": {"prompt": "1+1?", "completion": "2"},
    "chat": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                          {"role": "assistant", "content": "2"}]},
    "preference": {"prompt": "1+1?", "chosen": "2", "rejected": "3"},
    "chat_preference": {"prompt": [{"role": "user", "content": "1+1?"}],
                        "chosen": [{"role": "assistant", "content": "2"}],
                        "rejected": [{"role": "assistant", "content": "3"}]},
    "rl": {"prompt": "1+1?", "reference_answer": "2"},
}


def test_every_format_has_a_good_example_that_validates() -> None:
    assert set(GOOD_RECORDS) == set(FORMATS)
    for fmt, record in GOOD_RECORDS.items():
        [model] = validate_records([(1, record)], fmt, "good.jsonl")
        assert isinstance(model, FORMATS[fmt])
        assert model.model_dump() == record


@pytest.mark.parametrize(
    ("fmt", "record", "expected"),
    [
        ("sft", {"prompt": "q"}, "field 'completion': Field required"),
        ("sft", {"prompt": "q", "completion": "a", "completon": "a"}, "field 'completon': Extra inputs are not permitted"),
        ("sft", {"prompt": 5, "completion": "a"}, "field 'prompt': Input should be a valid string"),
        ("pretrain", {"text": "  \n"}, "field 'text': must not be empty or whitespace only"),
        ("chat", {"messages": [{"role": "user", "content": "q"}]}, "field 'messages': needs at least one assistant turn"),
        ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
         "field 'messages.1.content': must not be empty"),
        ("chat", {"messages": [{"role": "bot", "content": "a"}]}, "field 'messages.0.role': Input should be 'system'"),
        ("preference", {"prompt": "q", "chosen": "a", "rejected": "a "}, "field 'rejected': must differ from 'chosen'"),
        ("chat_preference", {**GOOD_RECORDS["chat_preference"], "rejected": [{"role": "assistant", "content": "2 "}]},
         "field 'rejected': must differ from 'chosen'"),
        ("chat_preference", {**GOOD_RECORDS["chat_preference"], "prompt": "1+1?"},
         "field 'prompt': Input should be a valid list"),
        ("chat_preference", {**GOOD_RECORDS["chat_preference"], "prompt": []},
         "field 'prompt': must end with a user turn (ends with nothing)"),
        ("rl", {"prompt": "q", "reference_answer": ""}, "field 'reference_answer': must not be empty"),
    ],
)
def test_bad_row_is_named_by_source_row_and_field(fmt: str, record: dict, expected: str) -> None:
    rows = [(1, GOOD_RECORDS[fmt]), (7, record), (8, {"nonsense": True})]
    with pytest.raises(DataError, match=re.escape(f"data.jsonl:7: {expected}")) as caught:
        validate_records(rows, fmt, "data.jsonl")
    assert ":8:" not in str(caught.value)  # stops at the first bad row


def test_unknown_format_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown dataset format 'dpo'"):
        validate_records([], "dpo", "data.jsonl")


def test_gsm8k_first_500_rows_convert() -> None:
    rows = gsm8k_rows(500)
    assert len(rows) == 500
    for row in rows:
        sft, chat, rl = gsm8k_to_sft(row), gsm8k_to_chat(row), gsm8k_to_rl(row)
        assert sft.prompt == row["question"].strip()
        assert sft.completion == row["answer"].strip()
        assert sft.completion.endswith(f"#### {row['answer'].split('####')[-1].strip()}")
        assert [m.role for m in chat.messages] == ["user", "assistant"]
        assert [m.content for m in chat.messages] == [sft.prompt, sft.completion]
        assert rl.prompt == sft.prompt
        float(rl.reference_answer)  # parses as a number
        assert "," not in rl.reference_answer
    assert sum("<<" in gsm8k_to_sft(row).completion for row in rows) > 400  # calculator annotations kept


@pytest.mark.parametrize(
    ("answer", "expected"),
    [("so 2 + 2 = 4\n#### 4", "4"), ("#### 1,200", "1200"), ("#### -3", "-3"), ("#### 2.5 ", "2.5")],
)
def test_gsm8k_final_answer(answer: str, expected: str) -> None:
    assert gsm8k_final_answer(answer) == expected


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"question": "q", "answer": "it is 4"}, r"train.jsonl:3: field 'answer': no '####' final-answer marker"),
        ({"question": "q", "answer": "#### four"}, r"train.jsonl:3: field 'answer': final answer 'four' .* not a number"),
        ({"answer": "#### 4"}, r"train.jsonl:3: field 'question': missing"),
        ({"question": ["q"], "answer": "#### 4"}, r"train.jsonl:3: field 'question': must be a string, got list"),
    ],
)
def test_gsm8k_bad_record_is_named(record: dict, expected: str) -> None:
    for convert in (gsm8k_to_sft, gsm8k_to_chat, gsm8k_to_rl):
        with pytest.raises(DataError, match=expected):
            convert(record, where="train.jsonl:3")


# --- SFT tokenization -----------------------------------------------------------------


class _TextsConfig(StrictConfig):
    rows: int


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """A 400-token byte-level BPE trained on the first 200 GSM8K rows (as curate formats them)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sft-tokenizer")
    texts = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in gsm8k_rows(200)]
    produce(ComponentSpec(name="texts", version="1"), _TextsConfig(rows=len(texts)), {}, str(root / "dataset"),
            lambda out_dir, _: {"shards": write_shards(out_dir, {"text": texts}, 1000)})
    train_tokenizer(TokenizerConfig(vocab_size=400), str(root / "dataset"), str(root / "tokenizer"))
    return AutoTokenizer.from_pretrained(root / "tokenizer")


def _unmasked_runs(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of positions whose label is kept."""
    runs: list[list[int]] = []
    for keep, group in itertools.groupby(zip(input_ids, labels), key=lambda pair: pair[1] != IGNORE_INDEX):
        if keep:
            runs.append([token for token, _ in group])
    return runs


def test_prompt_completion_loss_is_on_the_completion_and_end_of_turn_only(tokenizer) -> None:
    example = gsm8k_to_sft(gsm8k_rows(1)[0])
    input_ids, labels = tokenize_prompt_completion(tokenizer, example)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}],
        tokenize=False,
    )
    assert tokenizer.decode(input_ids) == rendered
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(input_ids, labels))
    [answer] = _unmasked_runs(input_ids, labels)
    assert tokenizer.decode(answer) == example.completion + "<|im_end|>"
    first_kept = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(input_ids[:first_kept]) == f"<|im_start|>user\n{example.prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(input_ids[first_kept + len(answer):]) == "\n"


def test_chat_loss_covers_every_assistant_turn(tokenizer) -> None:
    chat = SFTChat.model_validate({"messages": [
        {"role": "system", "content": "Answer with a number."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "#### 20"},
    ]})
    input_ids, labels = tokenize_chat(tokenizer, chat)
    assert [tokenizer.decode(run) for run in _unmasked_runs(input_ids, labels)] == ["5<|im_end|>", "#### 20<|im_end|>"]


def test_template_without_generation_markers_masks_the_same_tokens(tokenizer) -> None:
    """Released models' templates have no {% generation %} spans; rendering turn by turn must
    find exactly the tokens the spans mark (content and end of turn, not the newline after)."""
    plain = tokenizer.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    chat = SFTChat.model_validate({"messages": [
        {"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "5"}, {"role": "user", "content": "And times 4?"},
        {"role": "assistant", "content": "#### 20"}]})
    single = SFTPromptCompletion(prompt="1+1?", completion="2")
    marked = tokenize_chat(tokenizer, chat), tokenize_prompt_completion(tokenizer, single)
    original = tokenizer.chat_template
    tokenizer.chat_template = plain
    try:
        assert (tokenize_chat(tokenizer, chat), tokenize_prompt_completion(tokenizer, single)) == marked
        # a template that renders earlier turns differently once more follow them
        tokenizer.chat_template = "{% for m in messages %}{{ m['content'] if loop.last else m['content'][:1] }}{% endfor %}"
        with pytest.raises(DataError, match="assistant turn 2"):
            tokenize_chat(tokenizer, chat)
    finally:
        tokenizer.chat_template = original


# --- packing --------------------------------------------------------------------------


def _example(length: int, tag: int) -> tuple[list[int], list[int]]:
    """Tokens tag*100+i; the second half carries loss (a prompt/answer split)."""
    ids = [tag * 100 + i for i in range(length)]
    return ids, [IGNORE_INDEX if i < length // 2 else token for i, token in enumerate(ids)]


def _tags(ids: list[int], positions: list[int]) -> list[int]:
    bounds = document_boundaries(positions)
    return [ids[start] // 100 for start in bounds[:-1]]


def test_pack_sft_keeps_documents_whole_and_restarts_positions() -> None:
    examples = [_example(n, tag) for tag, n in enumerate([3, 7, 2, 5, 6, 4], start=1)]
    packed = pack_sft(examples, seq_len_tokens=10, pad_id=0)
    assert {len(block) for column in ("input_ids", "labels", "position_ids") for block in packed[column]} == {10}
    found = []
    for ids, labels, positions in zip(packed["input_ids"], packed["labels"], packed["position_ids"]):
        bounds = document_boundaries(positions)
        assert positions == [p for s, e in zip(bounds, bounds[1:]) for p in range(e - s)]
        for start, end in zip(bounds, bounds[1:]):
            segment = ids[start:end]
            if segment[0] == 0:  # padding: its own sequence, no loss, only at the block end
                assert end == 10 and set(segment) == {0} and set(labels[start:end]) == {IGNORE_INDEX}
                continue
            tag = segment[0] // 100
            original_ids, original_labels = examples[tag - 1]
            assert segment == original_ids  # whole, never split across blocks
            assert labels[start:end] == [IGNORE_INDEX, *original_labels[1:]]
            found.append(tag)
    assert sorted(found) == [1, 2, 3, 4, 5, 6]
    # first-fit decreasing, longest first: 7+3, 6+4, 5+2 and 3 tokens of padding (tag 0)
    assert [_tags(ids, positions) for ids, positions in zip(packed["input_ids"], packed["position_ids"])] == [
        [2, 1], [5, 6], [4, 3, 0]]
    assert packed["position_ids"][2] == [0, 1, 2, 3, 4, 0, 1, 0, 1, 2]
    assert packed["stats"] == {
        "examples": 6, "blocks": 3, "truncated": 0, "truncated_tokens": 0, "dropped_no_loss_tokens": 0, "padding_tokens": 3,
        "loss_tokens": sum(n - n // 2 for n in [3, 7, 2, 5, 6, 4]),
    }


def test_pack_sft_truncates_long_examples_and_counts_them() -> None:
    examples = [_example(12, 1), _example(4, 2)]
    packed = pack_sft(examples, seq_len_tokens=8, pad_id=0)
    assert packed["input_ids"][0] == examples[0][0][:8]
    assert packed["stats"]["truncated"] == 1 and packed["stats"]["truncated_tokens"] == 4
    with pytest.raises(DataError, match=r"train\[0\]: 12 tokens exceed seq_len_tokens=8"):
        pack_sft(examples, seq_len_tokens=8, pad_id=0, truncate=False, source="train")


def test_pack_sft_rejects_malformed_examples() -> None:
    with pytest.raises(DataError, match=r"examples\[1\]: 2 input_ids but 1 labels"):
        pack_sft([_example(2, 1), ([1, 2], [1])], seq_len_tokens=8, pad_id=0)
    with pytest.raises(ConfigError, match="seq_len_tokens"):
        pack_sft([_example(2, 1)], seq_len_tokens=1, pad_id=0)
    with pytest.raises(ValidationError):
        SFTPackConfig(seq_len_tokens=1)
    assert SFTPackConfig(seq_len_tokens=8).truncate is True


def test_boundaries_match_transformers_packed_sequence_conventions() -> None:
    import torch
    from transformers.masking_utils import find_packed_sequence_indices
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    positions = [0, 1, 2, 0, 1, 0, 1, 2, 3, 0]
    assert document_boundaries(positions) == [0, 3, 5, 9, 10]
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(torch.tensor([positions]))
    assert cu_seqlens.tolist() == document_boundaries(torch.tensor(positions))
    documents = find_packed_sequence_indices(torch.tensor([positions]))[0]
    assert torch.equal(block_diagonal_mask(positions), (documents[:, None] == documents[None, :]).tril())
    assert block_diagonal_mask([0, 1, 0]).tolist() == [[True, False, False], [True, True, False], [False, False, True]]
    for bad in ([1, 2, 3], [0, 1, 3]):
        with pytest.raises(DataError, match="position_ids"):
            document_boundaries(bad)


# --- the key property: packing does not change what the model computes ------------------


def _tiny_llama(vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(config).eval()


def _token_losses(logits, input_ids, labels, start: int, end: int):
    """Per-token next-token loss inside [start, end), only where the target carries loss."""
    import torch.nn.functional as F

    targets = labels[start + 1:end]
    keep = targets != IGNORE_INDEX
    losses = F.cross_entropy(logits[start:end - 1], input_ids[start + 1:end], reduction="none")
    return losses[keep]


def test_packed_document_has_the_same_per_token_loss_as_alone(tokenizer) -> None:
    import torch

    examples = [tokenize_prompt_completion(tokenizer, gsm8k_to_sft(row)) for row in gsm8k_rows(5)]
    examples = [example for example in examples if len(example[0]) < 200][:3]
    packed = pack_sft(examples, seq_len_tokens=600, pad_id=tokenizer.pad_token_id)
    assert packed["stats"]["blocks"] == 1 and packed["stats"]["padding_tokens"] > 0
    ids, labels, positions = (torch.tensor(packed[column][0]) for column in ("input_ids", "labels", "position_ids"))
    model = _tiny_llama(len(tokenizer))

    def forward(input_ids, position_ids, allowed):
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        with torch.no_grad():
            return model(input_ids=input_ids[None], position_ids=position_ids[None],
                         attention_mask=bias[None, None]).logits[0]

    packed_logits = forward(ids, positions, block_diagonal_mask(positions))
    plain_causal_logits = forward(ids, positions, torch.ones(len(ids), len(ids), dtype=torch.bool).tril())
    bounds = document_boundaries(positions)
    compared = 0
    for start, end in zip(bounds, bounds[1:]):
        if ids[start] == tokenizer.pad_token_id:
            continue
        alone_ids, alone_labels = ids[start:end], labels[start:end]
        alone_logits = forward(alone_ids, torch.arange(end - start), block_diagonal_mask(list(range(end - start))))
        alone = _token_losses(alone_logits, alone_ids, alone_labels, 0, end - start)
        in_pack = _token_losses(packed_logits, ids, labels, start, end)
        assert len(alone) > 10
        torch.testing.assert_close(in_pack, alone, rtol=1e-5, atol=1e-5)
        if start > 0:  # without the block-diagonal mask the later documents see the earlier ones
            leaky = _token_losses(plain_causal_logits, ids, labels, start, end)
            assert not torch.allclose(leaky, alone, atol=1e-4)
        compared += 1
    assert compared == 3
    # transformers derives the same mask from position ids alone when given no mask and no KV cache
    with torch.no_grad():
        from_positions = model(input_ids=ids[None], position_ids=positions[None], use_cache=False).logits[0]
    torch.testing.assert_close(from_positions, packed_logits, rtol=1e-5, atol=1e-5)
