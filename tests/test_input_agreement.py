"""Inputs that must agree are checked (issue 14, cases 1 and 5): a curation selection applies
only to the file curation read, and token ids cross artifacts only between identical tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from components.artifacts import read_manifest
from components.data.pack import PackConfig, pack
from components.data.sft_data import SFTDataConfig, sft_data
from components.data.tokenizer import TokenizerConfig, train_tokenizer
from components.errors import ConfigError, DataError
from components.eval.perplexity import PerplexityConfig, evaluate_perplexity
from components.models.tokenizers import check_same_tokenizer, tokenizer_differences, tokenizer_fingerprint
from components.train.config import TrainConfig
from components.train.optim import OptimConfig
from components.train.sft import SFTConfig, sft
from tests.conftest import REPO_ROOT, build_tiny_lm

TRAIN = REPO_ROOT / "data/raw/gsm8k/train.jsonl"
ONE_STEP = SFTConfig(train=TrainConfig(batch_size_rows=2, max_steps=1, checkpoint_every_steps=0,
                                       optim=OptimConfig(warmup_steps=1)))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root/curated (100 GSM8K train records), root/tok (vocab 400) and root/model with it;
    root/tok300 and root/model300: another tokenizer (vocab 300) and a model with it."""
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import ModelConfig, build_causal_lm

    root = tmp_path_factory.mktemp("agree")
    build_tiny_lm(root)
    train_tokenizer(TokenizerConfig(vocab_size=300), str(root / "curated"), str(root / "tok300"))
    other = AutoTokenizer.from_pretrained(root / "tok300")
    torch.manual_seed(0)
    build_causal_lm(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                max_position_embeddings=512), other).save_pretrained(root / "model300")
    other.save_pretrained(root / "model300")
    return root


def write_chats(path: Path, count: int) -> None:
    """`count` two-turn chats in TRL's conversational (`messages`) format."""
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} + {i} = {2 * i}\n#### {2 * i}"}]} for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# --------------------------------------------------------------------------- case 1: select


def test_a_curation_selection_is_refused_for_another_file(base: Path, tmp_path: Path) -> None:
    """300 user chats with GSM8K's curation as `select`: refused, naming both files and hashes
    (before: 248 examples published); without `select`, all 300."""
    chats = tmp_path / "my_chats.jsonl"
    write_chats(chats, 300)
    config = SFTDataConfig(format="messages", seq_len_tokens=256)
    with pytest.raises(DataError, match=r"select .*curated was curated from .*train.jsonl \(sha256:[0-9a-f]{12}\), "
                                        r"not from the dataset .*my_chats.jsonl \(sha256:[0-9a-f]{12}\)"):
        sft_data(config, str(chats), str(base / "tok"), str(tmp_path / "refused"), select=str(base / "curated"))
    assert not (tmp_path / "refused").exists()  # nothing published
    assert sft_data(config, str(chats), str(base / "tok"), str(tmp_path / "all")).metrics["examples"] == 300


def test_a_curation_selection_applies_to_the_file_curation_read(base: Path, tmp_path: Path) -> None:
    """The check is by content: the same bytes at another path are accepted (the curated
    records are kept); one byte changed is refused."""
    kept = read_manifest(str(base / "curated")).metrics["docs_out"]
    copy = tmp_path / "train_copy.jsonl"
    shutil.copyfile(TRAIN, copy)
    config = SFTDataConfig(seq_len_tokens=512)
    selected = sft_data(config, str(copy), str(base / "tok"), str(tmp_path / "same"), select=str(base / "curated"))
    assert selected.metrics["examples"] == kept == 100

    edited = tmp_path / "train_edited.jsonl"
    text = TRAIN.read_text(encoding="utf-8")
    edited.write_text(text.replace("?", "!", 1), encoding="utf-8")
    with pytest.raises(DataError, match=r"train_edited.jsonl \(sha256:"):
        sft_data(config, str(edited), str(base / "tok"), str(tmp_path / "edited"), select=str(base / "curated"))
    assert not (tmp_path / "edited").exists()


# --------------------------------------------------------------------------- case 5: tokenizers


def test_the_fingerprint_is_the_tokenizer_not_its_files(base: Path, tmp_path: Path) -> None:
    """Stable across save_pretrained and a tokenizer call's truncation state; changed by one
    added token or an edited chat template, each named."""
    from transformers import AutoTokenizer

    assert tokenizer_fingerprint(base / "tok") == tokenizer_fingerprint(base / "model")  # saved with the model
    tokenizer = AutoTokenizer.from_pretrained(base / "tok")
    tokenizer.backend_tokenizer.enable_truncation(max_length=7)  # recorded in tokenizer.json, changes no id
    tokenizer.save_pretrained(tmp_path / "truncating")
    assert "truncation" in (tmp_path / "truncating/tokenizer.json").read_text()
    assert check_same_tokenizer("a", base / "tok", "b", tmp_path / "truncating") == tokenizer_fingerprint(base / "tok")

    grown = AutoTokenizer.from_pretrained(base / "tok")
    grown.add_tokens(["<extra>"])
    grown.save_pretrained(tmp_path / "grown")
    with pytest.raises(ConfigError, match=r"a .*tok and b .*grown use different tokenizers .*vocabulary: 400 vs 401 "
                                          r"tokens, 1 differ \(e.g. '<extra>': id None vs 400\)"):
        check_same_tokenizer("a", base / "tok", "b", tmp_path / "grown")
    templated = AutoTokenizer.from_pretrained(base / "tok")
    templated.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert tokenizer_differences(tokenizer, templated) == ["chat template differs"]
    templated.save_pretrained(tmp_path / "templated")
    assert tokenizer_fingerprint(tmp_path / "templated") != tokenizer_fingerprint(base / "tok")


def test_sft_refuses_blocks_of_another_tokenizer(base: Path, tmp_path: Path) -> None:
    """Blocks by the 400-token tokenizer, a model with the 300-token one: refused before
    training, nothing published; the model with the blocks' tokenizer trains, and the shared
    fingerprint is in the blocks' and the model's manifests. With the tokenizer directory
    gone, the fingerprint recorded in the blocks' manifest still decides."""
    blocks = sft_data(SFTDataConfig(seq_len_tokens=512, max_examples=8), str(TRAIN), str(base / "tok"),
                      str(tmp_path / "blocks"))
    with pytest.raises(ConfigError, match=r"the tokenizer that made blocks .*blocks: .*tok and model .*model300 use "
                                          r"different tokenizers .*vocabulary: 400 vs 300 tokens"):
        sft(ONE_STEP, str(tmp_path / "blocks"), str(base / "model300"), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    trained = sft(ONE_STEP, str(tmp_path / "blocks"), str(base / "model"), str(tmp_path / "sft")).metrics
    assert trained["tokenizer_fingerprint"] == blocks.metrics["tokenizer_fingerprint"] == tokenizer_fingerprint(base / "tok")

    shutil.copytree(base / "tok", tmp_path / "tok_copy")
    sft_data(SFTDataConfig(seq_len_tokens=512, max_examples=8), str(TRAIN), str(tmp_path / "tok_copy"),
             str(tmp_path / "orphan"))
    shutil.rmtree(tmp_path / "tok_copy")
    with pytest.raises(ConfigError, match=r"blocks .*orphan was tokenized by .*tok_copy \(sha256:[0-9a-f]{12}\), which "
                                          r"is not the tokenizer of model .*model300"):
        sft(ONE_STEP, str(tmp_path / "orphan"), str(base / "model300"), str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    sft(ONE_STEP, str(tmp_path / "orphan"), str(base / "model"), str(tmp_path / "sft_orphan"))


def test_evaluate_refuses_a_unigram_baseline_from_another_tokenizer(base: Path, tmp_path: Path) -> None:
    pack(PackConfig(seq_len_tokens=64), str(base / "curated"), str(base / "tok"), str(tmp_path / "pack"))
    config = PerplexityConfig(max_docs=4)
    with pytest.raises(ConfigError, match=r"blocks .*pack: .*tok and model .*model300 use different tokenizers"):
        evaluate_perplexity(config, str(base / "model300"), str(base / "curated"), str(tmp_path / "pack"),
                            str(tmp_path / "refused"))
    assert not (tmp_path / "refused").exists()
    metrics = evaluate_perplexity(config, str(base / "model"), str(base / "curated"), str(tmp_path / "pack"),
                                  str(tmp_path / "eval")).metrics
    assert metrics["docs"] == 4 and metrics["tokenizer_fingerprint"] == tokenizer_fingerprint(base / "tok")
    assert read_manifest(str(tmp_path / "pack")).metrics["tokenizer_fingerprint"] == metrics["tokenizer_fingerprint"]
