"""What this machine's CPU can do: its bf16 matrix units (from /proc/cpuinfo flags) and its
measured matmul throughput in fp32 and under bf16 autocast, for the hardware catalog's `CPU`
entry (MFU and time estimates against the machine the code runs on, not a constant for one box).

Invariant: a probe is measured once per (CPU model, thread count, torch version) and cached
in `cpu_peak.json` under `$CRUCIBLE_PROBE_CACHE_DIR` (default `$XDG_CACHE_HOME/crucible`,
else ~/.cache/crucible); every later call reads the cache.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

CPUINFO = Path("/proc/cpuinfo")
CACHE_FILE = "cpu_peak.json"
# x86 flags of units that run bf16 matmuls natively (Intel AMX; AVX512-BF16 on Cooper Lake,
# Sapphire Rapids and AMD Zen 4+); without them oneDNN emulates bf16 through fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
MATMUL_SIZE = 2048
REPEATS = 5


def cpu_flags(cpuinfo_text: str) -> set[str]:
    """The `flags` of the first processor in /proc/cpuinfo's text (empty set if none)."""
    for line in cpuinfo_text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "flags":
            return set(value.split())
    return set()


def bf16_units(flags: set[str]) -> list[str]:
    """The bf16 matrix units among `flags`, in `BF16_FLAGS` order."""
    return [flag for flag in BF16_FLAGS if flag in flags]


def _cpuinfo_text() -> str:
    return CPUINFO.read_text(encoding="utf-8", errors="replace") if CPUINFO.is_file() else ""


def this_cpu_bf16_units() -> list[str]:
    """This machine's bf16 units (none where /proc/cpuinfo is missing: not Linux)."""
    return bf16_units(cpu_flags(_cpuinfo_text()))


def cpu_model_name() -> str:
    for line in _cpuinfo_text().splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    import platform

    return platform.processor() or platform.machine() or "unknown CPU"


def probe_key() -> str:
    """What a cached probe is valid for: CPU model, torch's thread count, torch version."""
    import torch

    return f"{cpu_model_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}"


def cache_path() -> Path:
    root = os.environ.get("CRUCIBLE_PROBE_CACHE_DIR")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = str(Path(xdg) / "crucible") if xdg else str(Path.home() / ".cache" / "crucible")
    return Path(root) / CACHE_FILE


def matmul_tflops(size: int = MATMUL_SIZE, repeats: int = REPEATS) -> dict[str, float]:
    """Peak TFLOP/s of a [size, size] @ [size, size] fp32 matmul (2 size^3 FLOP), plain and under
    bf16 autocast (its casts included, as a training step pays them): the fastest of `repeats`
    after one warm-up (a peak; another process sharing the cores only slows some repeats)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    measured = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            torch.matmul(a, b)
            times_s = []
            for _ in range(repeats):
                started = time.perf_counter()
                torch.matmul(a, b)
                times_s.append(time.perf_counter() - started)
        measured[precision] = 2 * size**3 / min(times_s) / 1e12
    return measured


def cpu_peak(path: Path | None = None) -> dict[str, Any]:
    """This machine's probe: {"key", "fp32_tflops", "bf16_tflops", "bf16_units", "measured_at"},
    from the cache at `path` (default `cache_path()`) when it holds this `probe_key()`, else
    measured now and added to it (written atomically; an unreadable cache is measured over)."""
    path = path or cache_path()
    key = probe_key()
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), dict):
        return cached[key]
    tflops = matmul_tflops()
    entry = {"key": key, "fp32_tflops": round(tflops["fp32"], 4), "bf16_tflops": round(tflops["bf16"], 4),
             "bf16_units": this_cpu_bf16_units(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "load_average_1min": round(os.getloadavg()[0], 2)}  # above the thread count: measured while shared
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps({**cached, key: entry}, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return entry
