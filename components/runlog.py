"""The run log: what a run writes as it goes, how it is read back, and how it is published.

Invariant: a run's live step log (`metrics.jsonl` in its run directory) is append-only, one
JSON record per finished step, and a reader drops a last line a crash cut short; everything
published about a run (csv for `dvc plots`, a markdown summary) is derived from that log.

Components do not import an orchestrator. A driver that wants per-step updates (a Prefect
task updates a progress artifact) sets `step_observer` around the component call; the
training loop calls it after every optimizer step on rank 0.
"""

from __future__ import annotations

import contextvars
import csv
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

STEP_LOG_FILE = "metrics.jsonl"  # the live log in a run directory
PUBLISHED_STEP_LOG_FILE = "train_metrics.jsonl"  # its copy in the published artifact
PUBLISHED_STEP_CSV_FILE = "train_metrics.csv"
TRAIN_REPORT_FILE = "train_report.md"

StepObserver = Callable[[str, dict[str, Any], int], None]  # (trainer, step record, max_steps)

step_observer: contextvars.ContextVar[StepObserver | None] = contextvars.ContextVar("step_observer", default=None)
log = logging.getLogger(__name__)


def notify_step(trainer: str, record: dict[str, Any], max_steps: int) -> None:
    observer = step_observer.get()
    if observer is None:
        return
    try:
        observer(trainer, record, max_steps)
    except Exception as error:  # a failing progress display must not stop training
        log.warning("step observer failed: %s", error)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The step records of a metrics log; a last line cut short by a crash is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as sink:
        sink.write(json.dumps(record) + "\n")


def log_step(metrics_path: Path, record: dict[str, Any], description: str, max_steps: int) -> None:
    """Append a step record to the live metrics log and tell the flow's progress observer."""
    append_record(metrics_path, record)
    notify_step(description, record, max_steps)


def write_records(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Records as jsonl, replacing `path`."""
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")


def write_csv(path: Path, records: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> None:
    """The named columns of `records` (others ignored, missing ones empty), for `dvc plots`."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)


def metrics_table(title: str, metrics: Mapping[str, Any]) -> list[str]:
    """A markdown `| metric | value |` table of a run's scalar metrics (floats to 4 significant digits)."""
    lines = [f"# {title}", "", "| metric | value |", "|---|---|"]
    return lines + [f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |"
                    for key, value in metrics.items() if not isinstance(value, (list, dict))]
