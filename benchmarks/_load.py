"""Machine load for the benchmarks: with 2 threads on 2 cores, another busy process slows a
run several-fold, so each benchmark runs each side alone in a child process pinned to its threads,
measures other processes' CPU use and waits for quiet."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

BUSY_CORES = 0.25  # other processes' use, in cores, above which the machine counts as busy


def system_busy_s() -> float:
    """CPU seconds every process has used since boot (idle, iowait and guest time excluded)."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def process_cpu_s() -> float:
    """CPU seconds this process (and its waited-for children) used."""
    t = os.times()
    return t.user + t.system


def other_cores(interval_s: float = 2.0) -> float:
    """Cores busy right now (this process is idle while it measures)."""
    before = system_busy_s()
    time.sleep(interval_s)
    return (system_busy_s() - before) / interval_s


def wait_idle(max_wait_s: float, busy_cores: float = BUSY_CORES) -> float:
    """Wait (up to max_wait_s) until the machine is idle; return the last busy-core reading."""
    deadline = time.monotonic() + max_wait_s
    busy = other_cores()
    while busy > busy_cores and time.monotonic() < deadline:
        print(f"    machine busy ({busy:.2f} cores used by other processes), waiting ...", flush=True)
        time.sleep(5)
        busy = other_cores()
    return busy


def run_child(side: str, command: list[str], log: Path, threads: int, timeout_s: float) -> tuple[Any, float]:
    """Run one side's child (offline, `threads` BLAS threads, output into `log`); return its exit
    code ("timeout" past timeout_s) and its wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    print(f"[{side}] running ...", flush=True)
    started = time.perf_counter()
    with open(log, "w") as sink:
        try:
            rc: Any = subprocess.run(command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                     timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return rc, time.perf_counter() - started
