"""bf16 autocast, and whether this machine's bf16 arithmetic is real.

Invariant: a computation asked to run in bf16 runs in bf16 (the numbers are the config's, on
every machine); where an x86 CPU has no bf16 matrix unit (Intel AMX, AVX512-BF16) oneDNN emulates
bf16 through fp32, and `precision_autocast` says so in a warning instead of leaving the user to find out
from the clock. Measured on an AVX2-only AMD EPYC (2 threads, torch 2.13; benchmarks/bf16_emulation.md):
a 2048^3 matmul at 0.0003 TFLOP/s under bf16 autocast against 0.16 in fp32, 540x slower; one LoRA
SFT step of SmolLM2-135M (4 x 1,024 tokens) took 657 s.
`precision: auto` (`choose_precision`) picks fp32 there; the trainers, the accuracy and agent evaluators
and `crucible agent run` resolve it the same way (`precision_for`).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CPUINFO = Path("/proc/cpuinfo")
AUTO_HELP = ("auto: bf16 where the CPU has a bf16 unit (AMX, AVX512-BF16), else fp32 "
             "(components.models.precision.precision_for); metrics.json records the choice and why.")
# x86 flags of units that run bf16 matmuls natively (Intel AMX; AVX512-BF16 on Cooper Lake,
# Sapphire Rapids and AMD Zen 4+); without them oneDNN emulates bf16 through fp32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


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


def cpuinfo_text() -> str:
    return CPUINFO.read_text(encoding="utf-8", errors="replace") if CPUINFO.is_file() else ""


@functools.cache
def this_cpu_flags() -> frozenset[str]:
    """This machine's x86 CPU flags, read once (empty where there is no x86 `flags` line: not
    Linux, or an ARM CPU, which lists `Features` instead)."""
    return frozenset(cpu_flags(cpuinfo_text()))


def this_cpu_bf16_units() -> list[str]:
    """This machine's bf16 units (none where its flags are unknown)."""
    return bf16_units(set(this_cpu_flags()))


def emulated_bf16_warning(flags: set[str] | frozenset[str]) -> str:
    """Why bf16 is slow on the x86 CPU with these `flags`, or "" where it has a bf16 unit or the
    flags are unknown (no x86 flags line: nothing is claimed)."""
    if not flags or bf16_units(set(flags)):
        return ""
    return ("precision bf16 on a CPU with no bf16 matrix unit (" + ", ".join(BF16_FLAGS) + " absent from "
            "/proc/cpuinfo): its bf16 matmuls are emulated, hundreds of times slower than fp32 "
            "(components/models/precision.py); precision: auto or fp32 runs in fp32 here")


def precision_autocast(device_type: str, precision: str, flags: set[str] | frozenset[str] | None = None) -> Any:
    """`torch.autocast(device_type, bfloat16, enabled=precision == "bf16")` (so fp32 inside an
    outer bf16 autocast turns it off, as torch's does), warning first when bf16 is asked of a CPU
    whose bf16 is emulated. `flags`: the CPU's x86 flags (default: this machine's)."""
    import torch

    if precision == "bf16" and device_type == "cpu":
        message = emulated_bf16_warning(this_cpu_flags() if flags is None else flags)
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")


def choose_precision(requested: str, device_type: str, bf16_support: str | None,
                     emulated_bf16: str = "") -> tuple[str, str]:
    """(precision, why). `auto` is bf16 autocast with fp32 master weights where the device has
    bf16 arithmetic (`bf16_support` names it: CUDA's, or a CPU's AMX / AVX512-BF16 units), fp32
    otherwise; any other request is taken as given, and an explicit bf16 on a CPU that emulates it
    says so (`emulated_bf16`: `emulated_bf16_warning`'s text)."""
    if requested == "bf16" and emulated_bf16:
        return "bf16", f"precision: bf16 in the config; {emulated_bf16}"
    if requested != "auto":
        return requested, f"precision: {requested} in the config"
    if bf16_support:
        return "bf16", f"auto: {device_type} has bf16 ({bf16_support}); bf16 autocast, fp32 master weights"
    return "fp32", f"auto: {device_type} has no bf16 matrix unit (AMX, AVX512-BF16 or CUDA bf16)"


def bf16_support(device: torch.device) -> str | None:
    """What gives `device` bf16 arithmetic, or None: CUDA's bf16 (compute capability), or the
    CPU's bf16 units from /proc/cpuinfo."""
    import torch

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"CUDA bf16, compute capability {major}.{minor}" if torch.cuda.is_bf16_supported() else None
    units = this_cpu_bf16_units() if device.type == "cpu" else []
    return ", ".join(units) or None


def precision_for(requested: str, device: torch.device) -> tuple[str, str]:
    """`choose_precision` for this machine's `device`."""
    emulated = emulated_bf16_warning(this_cpu_flags()) if (requested, device.type) == ("bf16", "cpu") else ""
    return choose_precision(requested, device.type, bf16_support(device) if requested == "auto" else None, emulated)


def precision_record(requested: str, device: torch.device) -> dict[str, str]:
    """{"precision", "precision_reason"}: `precision_for`'s choice as an artifact's metrics record it."""
    precision, reason = precision_for(requested, device)
    return {"precision": precision, "precision_reason": reason}
