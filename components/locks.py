"""One process-wide lock: at most one thread of a process trains, samples from the global
random generators, or builds or loads a model at a time.

Why one: training seeds and saves the process-wide RNGs (torch, Python, numpy) and uses every
core, so two trainers in one process (tasks of a flow on a thread pool) would share random
streams and break seeded, exactly resumable runs; and transformers' model construction is
not thread-safe (weight tying, lazily resolved classes), so two loads at once can leave a
model's embeddings untied. The lock is re-entrant: a trainer that holds it loads its models
under it. Separate processes (Dask workers, the deepspeed launcher) run side by side.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_LOCK = threading.RLock()


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold the process's lock (also usable as a decorator: `@exclusive()`)."""
    with _LOCK:
        yield
