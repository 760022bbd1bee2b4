"""SFT data, the SFT trainer (full and LoRA) and prompt tuning, on real tiny artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.data.curate import curate
from components.data.sft_data import SFTDataConfig, sft_data
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from components.errors import ConfigError, DataError
from components.models.factory import ModelConfig, build_causal_lm
from components.train.config import TrainConfig
from components.train.optim import OptimConfig
from components.train.prompt_tuning import PromptTuningConfig, initial_prompt, prompt_tuning
from components.train.sft import LoraSettings, SFTConfig, load_blocks, sft
from components.runlog import PUBLISHED_STEP_LOG_FILE
from flows.params import heldout_curation
from tests.conftest import REPO_ROOT

TRAIN = REPO_ROOT / "data/raw/gsm8k/train.jsonl"
HELDOUT = REPO_ROOT / "data/raw/gsm8k/test.jsonl"
TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                   max_position_embeddings=512)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A curated subset, a tokenizer and an (untrained) tiny model saved in transformers format."""
    import torch
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sft")
    curate(heldout_curation().model_copy(update={"max_docs": 120}), str(TRAIN), str(root / "curated"))
    train_tokenizer(TokenizerConfig(vocab_size=400), str(root / "curated"), str(root / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    build_causal_lm(TINY, tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    sft_data(SFTDataConfig(seq_len_tokens=512), str(TRAIN), str(root / "tok"), str(root / "blocks"),
             select=str(root / "curated"))
    return root


def test_sft_data_packs_the_curated_records_with_an_assistant_only_loss(base: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from components.artifacts import read_manifest

    stats = read_manifest(str(base / "blocks")).metrics
    assert stats["examples"] == 120  # exactly the records curation kept
    assert stats["blocks"] < stats["examples"] and stats["fill_ratio"] > 0.9
    columns = load_blocks(base / "blocks")
    assert set(columns) == {"input_ids", "labels", "position_ids"}
    tokenizer = AutoTokenizer.from_pretrained(base / "tok")
    labels = columns["labels"]
    trained_text = tokenizer.decode(labels[labels != -100])
    assert trained_text.count("####") >= 120 - stats["truncated"]  # every whole answer, with its final line
    assert "<|im_start|>" not in trained_text and "Question" not in trained_text  # never prompts or headers
    assert int((columns["position_ids"] == 0).sum()) == 120 + int((columns["input_ids"][:, -1] == tokenizer.pad_token_id).sum())
    assert stats["loss_tokens"] == int((columns["labels"] != -100).sum()) and torch.all(columns["labels"][:, 0] == -100)


def test_a_packed_block_has_the_loss_of_its_examples_trained_alone(base: Path) -> None:
    """Per-document positions keep packed examples apart: the summed loss of a block equals
    the sum of each example's loss computed on its own."""
    import torch
    from transformers import AutoModelForCausalLM

    from components.train.modules import CausalLMLoss

    module = CausalLMLoss(AutoModelForCausalLM.from_pretrained(base / "model", attn_implementation="sdpa")).eval()
    columns = load_blocks(base / "blocks")
    busiest = int((columns["position_ids"] == 0).sum(dim=1).argmax())  # the block holding the most examples
    block = {name: tensor[busiest:busiest + 1] for name, tensor in columns.items()}
    starts = (block["position_ids"][0] == 0).nonzero().flatten().tolist() + [block["input_ids"].shape[1]]
    with torch.no_grad():
        packed = module(**block)
        alone = sum(module(input_ids=block["input_ids"][:, a:b], labels=block["labels"][:, a:b])
                    for a, b in zip(starts, starts[1:]))
    assert len(starts) > 2 and torch.allclose(packed, alone, rtol=1e-5)


def test_sft_learns_and_lora_trains_only_the_adapter(base: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    train = TrainConfig(batch_size_rows=4, max_steps=30, optim=OptimConfig(learning_rate=1e-2, warmup_steps=3))
    full = sft(SFTConfig(train=train), str(base / "blocks"), str(base / "model"), str(base / "full"))
    records = [json.loads(line) for line in (base / "full" / PUBLISHED_STEP_LOG_FILE).read_text().splitlines()]
    assert full.metrics["final_loss"] < records[0]["loss"] - 1.0
    assert full.metrics["trainable_params"] == full.metrics["params"]
    assert all(r["tokens"] <= 4 * 512 and r["loss_tokens"] < r["tokens"] for r in records)  # padding and prompts excluded

    lora_train = train.model_copy(update={"optim": OptimConfig(learning_rate=5e-2, warmup_steps=3, weight_decay=0.0)})
    lora = sft(SFTConfig(train=lora_train, lora=LoraSettings(r=4, alpha=8)), str(base / "blocks"), str(base / "model"),
               str(base / "lora"))
    assert 0 < lora.metrics["trainable_params"] < lora.metrics["params"] / 5
    assert lora.metrics["final_loss"] < records[0]["loss"] - 0.03  # frozen random embeddings: it learns, slowly
    assert json.loads((base / "lora/adapter/adapter_config.json").read_text())["r"] == 4
    before, after = load_file(base / "model/model.safetensors"), load_file(base / "lora/model.safetensors")
    assert before.keys() == after.keys()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])  # not adapted
    adapter = load_file(base / "lora/adapter/adapter_model.safetensors")
    a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    delta = after["model.layers.0.self_attn.q_proj.weight"] - before["model.layers.0.self_attn.q_proj.weight"]
    assert delta.abs().max() > 0 and torch.allclose(delta, (8 / 4) * b @ a, atol=1e-6)  # W + (alpha / r) B A
    AutoModelForCausalLM.from_pretrained(base / "lora")  # merged: a plain transformers model


def test_bad_sft_inputs_are_named(base: Path, tmp_path: Path) -> None:
    missing = tmp_path / "prompts.jsonl"
    missing.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    with pytest.raises(DataError, match=r"prompts.jsonl:1: missing column\(s\) \['completion'\] for SFT format 'prompt_completion'"):
        sft_data(SFTDataConfig(format="prompt_completion"), str(missing), str(base / "tok"), str(tmp_path / "a"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl: no SFT examples \(the dataset is empty\)"):
        sft_data(SFTDataConfig(), str(empty), str(base / "tok"), str(tmp_path / "b"))
    with pytest.raises(DataError, match=r"train.jsonl\[0\]: \d+ tokens exceed seq_len_tokens=64"):
        sft_data(SFTDataConfig(seq_len_tokens=64, truncate=False, max_examples=5), str(TRAIN), str(base / "tok"),
                 str(tmp_path / "c"))
    cut = sft_data(SFTDataConfig(seq_len_tokens=150, max_examples=20), str(TRAIN), str(base / "tok"), str(tmp_path / "d"))
    assert cut.metrics["truncated"] > 0 and cut.metrics["examples"] + cut.metrics["dropped_no_loss_tokens"] == 20
    short_context = tmp_path / "short_model"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base / "model")
    model.config.max_position_embeddings = 256
    model.save_pretrained(short_context)
    AutoTokenizer.from_pretrained(base / "tok").save_pretrained(short_context)
    with pytest.raises(ConfigError, match=r"rows of 512 tokens exceed the model's context \(256\)"):
        sft(SFTConfig(train=TrainConfig(batch_size_rows=2, max_steps=1, optim=OptimConfig(warmup_steps=1))),
            str(base / "blocks"), str(short_context), str(tmp_path / "e"))
    for name in "abce":
        assert not (tmp_path / name).exists()  # nothing published on failure


def test_text_initialisation_is_the_prompt_embeddings_repeated_to_k(base: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base / "tok")
    embeddings = AutoModelForCausalLM.from_pretrained(base / "model").get_input_embeddings().weight.detach()
    ids = tokenizer("Add.", add_special_tokens=False)["input_ids"]
    k = 2 * len(ids) + 1
    text = initial_prompt("text", k, embeddings, tokenizer, "Add.", seed=0)
    assert torch.equal(text, embeddings[torch.tensor((ids * 3)[:k])])
    vocab = initial_prompt("vocab", 5, embeddings, tokenizer, "Add.", seed=0)
    assert all(any(torch.equal(row, e) for e in embeddings) for row in vocab)
    random = initial_prompt("random", 5, embeddings, tokenizer, "Add.", seed=0)
    assert random.shape == (5, 32) and random.abs().max() <= 0.5
    assert not torch.equal(random, initial_prompt("random", 5, embeddings, tokenizer, "Add.", seed=1))


def test_prompt_tuning_trains_only_the_soft_prompt(base: Path) -> None:
    from safetensors.torch import load_file

    config = PromptTuningConfig(num_virtual_tokens=4, max_train_examples=32, max_heldout_examples=8, seq_len_tokens=512,
                                train=TrainConfig(batch_size_rows=8, max_steps=15, checkpoint_every_steps=0,
                                                  optim=OptimConfig(learning_rate=0.1, weight_decay=0.0, warmup_steps=0)))
    manifest = prompt_tuning(config, str(base / "model"), str(TRAIN), str(HELDOUT), str(base / "prompt"))
    prompt = load_file(base / "prompt/soft_prompt.safetensors")["soft_prompt"]
    assert prompt.shape == (4, 32) and manifest.metrics["trainable_params"] == 4 * 32
    assert not (base / "prompt/model.safetensors").exists()  # the model is an input, never copied
    assert manifest.metrics["heldout_loss"] < manifest.metrics["heldout_loss_at_init"]
