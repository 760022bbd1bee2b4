"""Tokenize SFT examples with a completion-only loss mask and pack them into fixed blocks.

Pretraining packing (`pack.py`) cuts one long stream anywhere; SFT cannot: an example cut
in two loses its prompt or its answer, and tokens of one example must not attend to
another's. So here every example stays whole inside one block, position ids restart at 0
for each example, and the attention implementation keeps examples apart either from those
position ids (flash-attention varlen, transformers' `DataCollatorWithFlattening`
convention) or from an explicit block-diagonal causal mask (`block_diagonal_mask`).
Labels are -100 ("ignore") everywhere except the assistant's tokens, so the loss trains
the answers, not the prompts or the chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from components.config import StrictConfig
from components.data.formats import SFTChat, SFTPromptCompletion
from components.errors import ConfigError, DataError
from components.models.chat import IGNORE_INDEX, TokenizedExample, tokenize_messages

if TYPE_CHECKING:
    import torch

class SFTPackConfig(StrictConfig):
    seq_len_tokens: int = Field(ge=2, description="Tokens per packed block; no example crosses a block.")
    truncate: bool = Field(
        True, description="Cut examples longer than a block (and count them); false makes them an error.",
    )


# --- tokenization ---------------------------------------------------------------------


def tokenize_prompt_completion(tokenizer: Any, example: SFTPromptCompletion) -> TokenizedExample:
    """(input_ids, labels) for a user prompt and assistant completion; loss on the completion only."""
    messages = [{"role": "user", "content": example.prompt}, {"role": "assistant", "content": example.completion}]
    return tokenize_messages(tokenizer, messages)


def tokenize_chat(tokenizer: Any, example: SFTChat) -> TokenizedExample:
    """(input_ids, labels) for a chat; loss on every assistant turn, nothing else."""
    return tokenize_messages(tokenizer, [message.model_dump() for message in example.messages])


# --- packing --------------------------------------------------------------------------


def fit_examples(
    examples: Sequence[TokenizedExample], seq_len_tokens: int, truncate: bool, source: str,
) -> tuple[list[TokenizedExample], int, int, int]:
    """Check each example and cut those longer than a block; returns (examples, truncated,
    tokens cut, dropped).

    Cutting keeps the start (prompt and the beginning of the answer), like TRL's SFT
    truncation; the cut example loses its end-of-turn token, which is why it is counted. An
    example cut before its first assistant token has nothing left to train on: it is dropped
    and counted, not packed as pure padding compute.
    """
    fitted: list[TokenizedExample] = []
    truncated = cut_tokens = dropped = 0
    for index, (input_ids, labels) in enumerate(examples):
        if len(input_ids) != len(labels):
            raise DataError(f"{source}[{index}]: {len(input_ids)} input_ids but {len(labels)} labels")
        if not input_ids:
            raise DataError(f"{source}[{index}]: empty example (no tokens)")
        if len(input_ids) > seq_len_tokens:
            if not truncate:
                raise DataError(
                    f"{source}[{index}]: {len(input_ids)} tokens exceed seq_len_tokens={seq_len_tokens} "
                    "(raise seq_len_tokens or set truncate: true)"
                )
            truncated += 1
            cut_tokens += len(input_ids) - seq_len_tokens
            input_ids, labels = input_ids[:seq_len_tokens], labels[:seq_len_tokens]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                dropped += 1
                continue
        fitted.append((list(input_ids), list(labels)))
    if not fitted:
        raise DataError(f"{source}: every example lost all its assistant tokens to truncation at {seq_len_tokens} tokens")
    return fitted, truncated, cut_tokens, dropped


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items (by index) to bins of `capacity`: longest first, each into the first bin it fits.

    Chosen over sequential (next-fit) packing because SFT examples are never split, so
    every block's unused tail is padding compute: next-fit closes a block whenever the next
    example does not fit, wasting up to half a block per long example, while FFD uses at most
    11/9 of the optimal number of blocks (Johnson 1973). The cost is that examples are
    reordered, which does not matter because the trainer shuffles blocks. Ties keep input
    order, so the packing is deterministic. O(examples x blocks): well under a second for
    SFT-sized datasets (GSM8K's 7.5k examples).
    """
    order = sorted(range(len(lengths)), key=lambda index: -lengths[index])
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        length = lengths[index]
        slot = next((b for b, space in enumerate(free) if space >= length), None)
        if slot is None:
            bins.append([])
            free.append(capacity)
            slot = len(bins) - 1
        bins[slot].append(index)
        free[slot] -= length
    return bins


def _build_block(
    documents: list[TokenizedExample], seq_len_tokens: int, pad_id: int,
) -> tuple[list[int], list[int], list[int]]:
    """Concatenate whole documents, restart positions per document, pad the tail as its own sequence.

    Each document's first label is set to -100 (as `DataCollatorWithFlattening` does): with
    the usual shift-by-one loss it would be predicted from the previous document's last
    token. The padding gets positions 0, 1, 2, ... so position-id based boundary detection
    (a restart at 0, or a jump other than +1) sees it as one separate sequence that no real
    token attends to, and its labels are -100.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    for doc_ids, doc_labels in documents:
        input_ids.extend(doc_ids)
        labels.append(IGNORE_INDEX)
        labels.extend(doc_labels[1:])
        position_ids.extend(range(len(doc_ids)))
    padding = seq_len_tokens - len(input_ids)
    input_ids.extend([pad_id] * padding)
    labels.extend([IGNORE_INDEX] * padding)
    position_ids.extend(range(padding))
    return input_ids, labels, position_ids


def pack_sft(
    examples_tokenized: Sequence[TokenizedExample],
    seq_len_tokens: int,
    pad_id: int,
    *,
    truncate: bool = True,
    source: str = "examples",
) -> dict[str, Any]:
    """Pack (input_ids, labels) examples into blocks of exactly `seq_len_tokens` tokens.

    Returns the per-block columns `input_ids`, `labels`, `position_ids` (lists of lists) and
    `stats`: examples, blocks, truncated (examples cut to fit), truncated_tokens,
    dropped_no_loss_tokens (cut before any assistant token),
    padding_tokens and loss_tokens (labels that are not -100). An example longer than a
    block is cut and counted, or is a DataError naming `source[index]` if `truncate` is false.
    """
    if seq_len_tokens < 2:
        raise ConfigError(f"seq_len_tokens must be at least 2, got {seq_len_tokens}")
    fitted, truncated, cut_tokens, dropped = fit_examples(examples_tokenized, seq_len_tokens, truncate, source)
    bins = first_fit_decreasing([len(ids) for ids, _ in fitted], seq_len_tokens)
    columns: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
    for members in bins:
        block = _build_block([fitted[index] for index in members], seq_len_tokens, pad_id)
        for name, values in zip(columns, block, strict=True):
            columns[name].append(values)
    real_tokens = sum(len(ids) for ids, _ in fitted)
    stats = {
        "examples": len(fitted),
        "blocks": len(bins),
        "truncated": truncated,
        "truncated_tokens": cut_tokens,
        "dropped_no_loss_tokens": dropped,
        "padding_tokens": len(bins) * seq_len_tokens - real_tokens,
        "loss_tokens": sum(label != IGNORE_INDEX for block in columns["labels"] for label in block),
    }
    return {**columns, "stats": stats}


# --- attention helpers ----------------------------------------------------------------


def document_boundaries(position_ids: Sequence[int] | Any) -> list[int]:
    """Cumulative sequence lengths (flash-attention's `cu_seqlens`) of one packed block.

    A document starts wherever the position id is 0, e.g. [0,1,2,0,1,0] -> [0,3,5,6]. Position
    ids must otherwise count up by one, so this agrees with both conventions transformers
    uses (restart at 0 for the flash varlen path, "jump other than +1" for its mask builder).
    Accepts a list or a 1-D tensor.
    """
    positions = position_ids.tolist() if hasattr(position_ids, "tolist") else list(position_ids)
    if not positions:
        return [0]
    if positions[0] != 0:
        raise DataError(f"position_ids must start at 0 (a block starts with a document), got {positions[0]}")
    starts = []
    for index, position in enumerate(positions):
        if position == 0:
            starts.append(index)
        elif position != positions[index - 1] + 1:
            raise DataError(
                f"position_ids[{index}] = {position} follows {positions[index - 1]}; "
                "within a document positions must count up by one"
            )
    return [*starts, len(positions)]


def block_diagonal_mask(position_ids: Sequence[int] | Any) -> torch.Tensor:
    """Boolean [seq, seq] mask, True where query i may attend to key j: j <= i and same document.

    For attention implementations that take an explicit mask instead of `cu_seqlens`. SDPA
    takes it as is (True = attend); eager attention *adds* its mask to the scores, so pass
    `torch.zeros(m.shape).masked_fill(~m, torch.finfo(dtype).min)[None, None]` instead.
    """
    import torch  # noqa: F811 (imported lazily: packing itself needs no torch)

    boundaries = document_boundaries(position_ids)
    lengths = torch.tensor([end - start for start, end in zip(boundaries, boundaries[1:])], dtype=torch.long)
    document = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    same_document = document[:, None] == document[None, :]
    causal = torch.ones(len(document), len(document), dtype=torch.bool).tril()
    return same_document & causal
