"""The rows a run trains on and the order it takes them in.

`TrainData` holds tensors with one row per sequence (packed blocks or padded examples) or per
preference pair, and says what a loss unit is (a next-token position, or a pair).
`EpochSampler` draws each optimizer step's global batch: the same rows on every rank, in an
order that depends only on (seed, epoch), so a restored (epoch, cursor) replays it exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from components.errors import ConfigError, DataError
from components.models.chat import IGNORE_INDEX

if TYPE_CHECKING:
    import torch


@dataclass
class TrainData:
    """Rows of tensors with one row per example along dim 0 (`input_ids`, `labels`, optionally
    `position_ids`, ...; preference pairs carry `chosen_*` / `rejected_*` columns instead).

    `loss_units(batch)` counts what the loss module's sum is a sum over (next-token positions
    by default; pairs for a preference loss): the loop divides by the global batch's count.
    `real_tokens(batch)` counts the non-padding tokens a throughput figure reports.
    """

    columns: dict[str, torch.Tensor]
    pad_token_id: int | None = None
    source: str = "dataset"
    required: tuple[str, ...] = ("input_ids", "labels")
    loss_units: Callable[[dict[str, torch.Tensor]], int] | None = None
    real_tokens: Callable[[dict[str, torch.Tensor]], int] | None = None

    def __post_init__(self) -> None:
        missing = [name for name in self.required if name not in self.columns]
        if missing:
            raise DataError(f"{self.source}: training data needs {' and '.join(self.required)}, has {sorted(self.columns)}")
        rows = {name: int(tensor.shape[0]) for name, tensor in self.columns.items()}
        if len(set(rows.values())) != 1:
            raise DataError(f"{self.source}: columns differ in row count: {rows}")
        if "input_ids" in self.columns and "labels" in self.columns and \
                self.columns["input_ids"].shape != self.columns["labels"].shape:
            raise DataError(f"{self.source}: columns differ in shape: input_ids {tuple(self.columns['input_ids'].shape)}"
                            f" vs labels {tuple(self.columns['labels'].shape)}")
        if len(self) == 0:
            raise DataError(f"{self.source}: the dataset is empty")
        if self.loss_units is None:
            if int((self.columns["labels"][:, 1:] != IGNORE_INDEX).sum()) == 0:
                raise DataError(f"{self.source}: no row has a token to train on (every label is {IGNORE_INDEX})")
            self.loss_units = count_loss_tokens
        if self.real_tokens is None:
            self.real_tokens = functools.partial(count_real_tokens, pad_token_id=self.pad_token_id)

    def __len__(self) -> int:
        return int(next(iter(self.columns.values())).shape[0])

    @property
    def width(self) -> int:
        return int(self.columns[self.required[0]].shape[-1])

    def rows(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: tensor[indices] for name, tensor in self.columns.items()}


class EpochSampler:
    """Global batches from a fresh seeded permutation each epoch; the state is (epoch, cursor).

    The permutation of epoch e depends only on (seed, e), so restoring (epoch, cursor)
    reproduces the remaining batches exactly. The tail that does not fill a batch is dropped.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int, source: str = "the training data") -> None:
        if num_rows < batch_size:
            raise ConfigError(f"batch_size_rows ({batch_size}) exceeds the {num_rows} rows of {source}")
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._permutation: torch.Tensor | None = None

    def _order(self) -> torch.Tensor:
        import torch

        if self._permutation is None:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._permutation = torch.randperm(self.num_rows, generator=generator)
        return self._permutation

    def next_batch(self) -> torch.Tensor:
        if self.cursor == self.num_rows // self.batch_size:
            self.epoch, self.cursor, self._permutation = self.epoch + 1, 0, None
        start = self.cursor * self.batch_size
        self.cursor += 1
        return self._order()[start:start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor, self._permutation = int(state["epoch"]), int(state["cursor"]), None


def count_loss_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Positions that contribute to a next-token loss: labels shifted by one, not ignored."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_real_tokens(batch: dict[str, torch.Tensor], pad_token_id: int | None) -> int:
    """Non-padding tokens (the "effective" tokens of a throughput figure)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if pad_token_id is None:
        return int(batch["input_ids"].numel())
    return int((batch["input_ids"] != pad_token_id).sum())
