"""What this machine's CPU can do: its bf16 matrix units (components.models.precision) and its
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

from components.models.precision import cpuinfo_text, emulated_bf16_warning, this_cpu_bf16_units, this_cpu_flags

CACHE_FILE = "cpu_peak.json"
MATMUL_SIZE = 2048
# Without bf16 units the bf16 matmul is emulated, and its rate falls with size (an AVX2-only AMD
# EPYC, TFLOP/s: 0.0014 at 256, 0.0010 at 1024, 0.0003 at 2048; benchmarks/bf16_emulation.md). It
# is probed at 1024: about 13 s instead of 6 minutes, a peak that overstates larger matmuls'.
EMULATED_BF16_MATMUL_SIZE = 1024
REPEATS = 5


def cpu_model_name() -> str:
    for line in cpuinfo_text().splitlines():
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


def matmul_seconds(size: int, precision: str, repeats: int = REPEATS) -> list[float]:
    """Seconds of each of `repeats` seeded [size, size] @ [size, size] fp32 matmuls (2 size^3 FLOP),
    plain (fp32) or under bf16 autocast (its casts included, as a training step pays them), after one
    warm-up."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        torch.matmul(a, b)
        times_s = []
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b)
            times_s.append(time.perf_counter() - started)
    return times_s


def matmul_tflops(size: int = MATMUL_SIZE, repeats: int = REPEATS, bf16_size: int | None = None) -> dict[str, float]:
    """Peak TFLOP/s in fp32 (n = `size`) and under bf16 autocast (n = `bf16_size`, default `size`):
    the fastest of `matmul_seconds` (a peak; another process sharing the cores only slows some repeats)."""
    return {precision: 2 * n**3 / min(matmul_seconds(n, precision, repeats)) / 1e12
            for precision, n in (("fp32", size), ("bf16", bf16_size or size))}


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
    units = this_cpu_bf16_units()
    bf16_size = EMULATED_BF16_MATMUL_SIZE if emulated_bf16_warning(this_cpu_flags()) else MATMUL_SIZE
    tflops = matmul_tflops(bf16_size=bf16_size)
    entry = {"key": key, "fp32_tflops": round(tflops["fp32"], 4), "bf16_tflops": round(tflops["bf16"], 4),
             "bf16_matmul_size": bf16_size, "bf16_units": units,
             "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
             "load_average_1min": round(os.getloadavg()[0], 2)}  # above the thread count: measured while shared
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.write_text(json.dumps({**cached, key: entry}, indent=2) + "\n", encoding="utf-8")
    os.replace(staging, path)
    return entry
