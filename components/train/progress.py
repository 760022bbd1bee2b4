"""Live training progress for whoever drives a trainer.

Components do not import an orchestrator. A driver that wants per-step updates (a Prefect
task updates a progress artifact) sets `step_observer` around the component call; the
training loop calls it after every optimizer step on rank 0.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import Any

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
