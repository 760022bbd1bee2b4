"""Held-out loss on answers: how well a model predicts the reference answers of problems it
was not trained on, the quantity supervised fine-tuning lowers.

Invariant: only answer tokens are scored. The input is an `sft_data` artifact built with
`packing: false` (one chat-templated example per row, labels on the assistant reply only, the
same masking the trainer uses), so the number is the SFT objective on held-out examples.
Reported: the token-weighted mean negative log-likelihood per answer token (nats) and its
perplexity, and the mean over examples of each example's per-token NLL with a 95 %
bootstrap interval over examples (`components.eval.intervals`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.errors import DataError
from components.models.precision import precision_autocast
from components.models.tokenizers import FINGERPRINT_KEY, check_blocks_tokenizer
from components.records import column_names, read_column

SPEC = ComponentSpec(name="answer_loss", version="2")  # 2: batches cut at their last label (same quantity)
METRICS_FILE = "metrics.json"


class AnswerLossConfig(StrictConfig):
    batch_rows: int = Field(8, gt=0, description="Examples per forward pass.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: forward under bf16 autocast.")


def example_nll(model: Any, input_ids: Any, labels: Any, batch_rows: int) -> tuple[list[float], list[int]]:
    """Each row's summed NLL of its labelled tokens (nats) and its number of labelled tokens.

    Rows are scored shortest first, each batch cut after its last labelled token: with causal
    attention nothing after a row's last label changes its scores, so padding costs little
    (GSM8K validation chats: mean 219 of 468 columns)."""
    import torch

    from components.models.chat import IGNORE_INDEX
    from components.models.logprobs import sequence_logprobs

    columns = torch.arange(1, labels.shape[1] + 1)
    ends = ((labels != IGNORE_INDEX) * columns).amax(-1).clamp(min=2)  # one past each row's last label
    sums, counts = [0.0] * len(labels), [0] * len(labels)
    with torch.no_grad():
        for batch in ends.argsort().split(batch_rows):
            width = int(ends[batch].max())
            ids, labs = input_ids[batch, :width], labels[batch, :width]
            for row, total, count in zip(batch.tolist(), (-sequence_logprobs(model, ids, labs)).tolist(),
                                         (labs[:, 1:] != IGNORE_INDEX).sum(-1).tolist(), strict=True):
                sums[row], counts[row] = total, count
    return sums, counts


def _build(config: AnswerLossConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    import torch

    from components.eval.intervals import bootstrap_interval
    from components.models.factory import load_causal_lm

    fingerprint = check_blocks_tokenizer("examples", paths["examples"], "model", paths["model"])
    if "position_ids" in column_names(paths["examples"]):
        raise DataError(f"examples {paths['examples']}: packed rows; build them with sft_data `packing: false`")
    model = load_causal_lm(paths["model"], dtype=torch.float32).eval()
    input_ids = torch.tensor(read_column(paths["examples"], "input_ids"), dtype=torch.long)
    labels = torch.tensor(read_column(paths["examples"], "labels"), dtype=torch.long)
    with precision_autocast("cpu", config.precision):
        sums, counts = example_nll(model, input_ids, labels, config.batch_rows)
    scored = [(s, c) for s, c in zip(sums, counts, strict=True) if c]
    per_example = [s / c for s, c in scored]
    nll = sum(s for s, _ in scored) / sum(c for _, c in scored)
    low, high = bootstrap_interval(per_example)
    metrics = {"examples": len(scored), "answer_tokens": sum(c for _, c in scored), "answer_nll_per_token": nll,
               "answer_perplexity": math.exp(nll), "example_mean_nll": sum(per_example) / len(per_example),
               "example_mean_nll_ci95_low": low, "example_mean_nll_ci95_high": high, FINGERPRINT_KEY: fingerprint}
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return metrics


def answer_loss(config: AnswerLossConfig, model: str, examples: str, dest: str, overwrite: bool = False) -> Manifest:
    """Score `model` on the answers of `examples` (an unpacked `sft_data` artifact)."""
    return produce(SPEC, config, {"model": model, "examples": examples}, dest,
                   lambda out_dir, paths: _build(config, paths, out_dir), overwrite=overwrite)
