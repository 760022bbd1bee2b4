"""Held-out perplexity, token-weighted, next to two baselines the model must beat.

Each held-out document is scored as `EOS doc EOS`: the leading EOS is the context every
document starts from in the packed training stream, and every following token (the
document and its closing EOS) is predicted. Perplexity is exp of the mean negative
log-likelihood over all predicted tokens of all documents (token-weighted).

Baselines on exactly the same predicted tokens:
- uniform: every token of the vocabulary equally likely, perplexity = vocabulary size;
- unigram: token frequencies of the training blocks with add-one (Laplace) smoothing.

The blocks' ids must be the model's tokenizer's (another tokenizer's ids would give the
unigram baseline the frequencies of other tokens): `check_blocks_tokenizer` refuses a
mismatch, and the shared fingerprint is recorded in the metrics.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.records import read_column
from components.models.tokenizers import FINGERPRINT_KEY, check_blocks_tokenizer

SPEC = ComponentSpec(name="perplexity", version="1")
METRICS_FILE = "metrics.json"


class PerplexityConfig(StrictConfig):
    batch_size_docs: int = Field(16, gt=0)
    max_length_tokens: int = Field(
        512, ge=2, description="Longer documents are truncated (and counted); capped at the model's context."
    )
    max_docs: int | None = Field(None, gt=0, description="Score only the first N documents.")


def _unigram_log_probs(blocks_dir: Path, vocab_size: int) -> "Any":
    import torch

    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for block in read_column(blocks_dir, "input_ids"):
        counts += torch.bincount(torch.tensor(block), minlength=vocab_size).double()
    return torch.log((counts + 1.0) / (counts.sum() + vocab_size))


def _build(config: PerplexityConfig, model_dir: Path, dataset: Path, blocks_dir: Path, out_dir: Path) -> dict[str, Any]:
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    fingerprint = check_blocks_tokenizer("blocks", blocks_dir, "model", model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    from components.models.factory import load_causal_lm

    model = load_causal_lm(model_dir).eval()
    texts = read_column(dataset, "text")[: config.max_docs]
    eos = tokenizer.eos_token_id
    max_length = min(config.max_length_tokens, model.config.max_position_embeddings)
    sequences, truncated = [], 0
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        sequence = [eos, *ids, eos]
        if len(sequence) > max_length:
            sequence, truncated = sequence[:max_length], truncated + 1
        sequences.append(sequence)

    vocab_size = model.config.vocab_size
    unigram = _unigram_log_probs(blocks_dir, vocab_size)
    model_nll = unigram_nll = 0.0
    predicted_tokens = 0
    with torch.inference_mode():
        for start in tqdm(range(0, len(sequences), config.batch_size_docs), desc="perplexity"):
            batch = sequences[start:start + config.batch_size_docs]
            width = max(map(len, batch))
            input_ids = torch.full((len(batch), width), eos, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, sequence in enumerate(batch):
                input_ids[row, : len(sequence)] = torch.tensor(sequence)
                mask[row, : len(sequence)] = 1
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
            targets, target_mask = input_ids[:, 1:], mask[:, 1:].bool()
            token_nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
            model_nll += token_nll[target_mask].double().sum().item()
            unigram_nll += -unigram[targets[target_mask]].sum().item()
            predicted_tokens += int(target_mask.sum())

    metrics = {
        "perplexity": math.exp(model_nll / predicted_tokens),
        "nll_per_token": model_nll / predicted_tokens,
        "unigram_perplexity": math.exp(unigram_nll / predicted_tokens),
        "uniform_perplexity": float(vocab_size),
        "tokens": predicted_tokens,
        "docs": len(sequences),
        "truncated_docs": truncated,
        FINGERPRINT_KEY: fingerprint,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def evaluate_perplexity(
    config: PerplexityConfig, model: str, dataset: str, blocks: str, dest: str, overwrite: bool = False
) -> Manifest:
    """Perplexity of the model artifact `model` on the `text` of `dataset`, with baselines
    fitted on the training `blocks`."""
    return produce(
        SPEC, config, {"model": model, "dataset": dataset, "blocks": blocks}, dest,
        lambda out_dir, paths: _build(config, paths["model"], paths["dataset"], paths["blocks"], out_dir),
        overwrite=overwrite,
    )
