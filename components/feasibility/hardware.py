"""Accelerator catalog: peak dense FLOP/s per precision, memory, interconnect.

Peak figures are the vendors' dense (no sparsity) numbers from their datasheets; memory is
what the device reports (GiB). Users extend or override entries with a YAML file of the
same shape (`crucible estimate --hardware-catalog my.yaml`). Names match ignoring case and
punctuation, and by common aliases (`h100` is `H100-SXM`; `a100` is ambiguous and refused).
The `CPU` entry is this machine's, probed (`components.feasibility.cpu_probe`, cached) on
first use of `BUILTIN_CATALOG` or `load_catalog`.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field

from components.config import StrictConfig, validate_config
from components.errors import ConfigError
from components.feasibility.cpu_probe import MATMUL_SIZE, REPEATS, cpu_peak

TERA = 1e12


class Accelerator(StrictConfig):
    peak_tflops: dict[str, float] = Field(description="Dense peak TFLOP/s by precision: bf16, fp16, fp8, fp32.")
    memory_gib: float = Field(gt=0)
    interconnect_gb_per_s: float = Field(gt=0, description="Intra-node bandwidth per device (NVLink, ICI, PCIe).")
    source: str = Field(description="Where the figures come from.")

    def peak_flops_per_s(self, precision: str) -> float:
        if precision not in self.peak_tflops:
            raise ConfigError(f"precision {precision!r} has no peak on this device (has {sorted(self.peak_tflops)})")
        return self.peak_tflops[precision] * TERA


DATASHEET_CATALOG: dict[str, Accelerator] = {
    "A100-40GB": Accelerator(peak_tflops={"bf16": 312, "fp16": 312, "fp32": 19.5}, memory_gib=40,
                             interconnect_gb_per_s=600, source="NVIDIA A100 datasheet (SXM, dense)"),
    "A100-80GB": Accelerator(peak_tflops={"bf16": 312, "fp16": 312, "fp32": 19.5}, memory_gib=80,
                             interconnect_gb_per_s=600, source="NVIDIA A100 datasheet (SXM, dense)"),
    "H100-SXM": Accelerator(peak_tflops={"bf16": 989, "fp16": 989, "fp8": 1979, "fp32": 67}, memory_gib=79.6,
                            interconnect_gb_per_s=900, source="NVIDIA H100 datasheet (SXM5, dense)"),
    "H100-PCIe": Accelerator(peak_tflops={"bf16": 756, "fp16": 756, "fp8": 1513, "fp32": 51}, memory_gib=79.6,
                             interconnect_gb_per_s=600, source="NVIDIA H100 datasheet (PCIe, dense)"),
    "H200": Accelerator(peak_tflops={"bf16": 989, "fp16": 989, "fp8": 1979, "fp32": 67}, memory_gib=140.4,
                        interconnect_gb_per_s=900, source="NVIDIA H200 datasheet (SXM, dense)"),
    "B200": Accelerator(peak_tflops={"bf16": 2250, "fp16": 2250, "fp8": 4500, "fp32": 75}, memory_gib=178.0,
                        interconnect_gb_per_s=1800, source="NVIDIA DGX B200 datasheet (per GPU, dense)"),
    "L4": Accelerator(peak_tflops={"bf16": 121, "fp16": 121, "fp8": 242, "fp32": 30.3}, memory_gib=22.5,
                      interconnect_gb_per_s=64, source="NVIDIA L4 datasheet (dense)"),
    "TPU-v4": Accelerator(peak_tflops={"bf16": 275, "fp32": 275 / 2}, memory_gib=32,
                          interconnect_gb_per_s=300, source="Google Cloud TPU v4 documentation"),
}


def probed_cpu() -> Accelerator:
    """This machine's CPU: peak fp32 and bf16 from the cached matmul probe (fp16 runs at the
    fp32 rate: no fp16 matrix unit is used on a CPU)."""
    probe = cpu_peak()
    units = ", ".join(probe["bf16_units"]) or "none"
    return Accelerator(
        peak_tflops={"bf16": probe["bf16_tflops"], "fp16": probe["fp32_tflops"], "fp32": probe["fp32_tflops"]},
        memory_gib=24, interconnect_gb_per_s=10,
        source=f"probed {probe['measured_at']} on {probe['key']}: the fastest of {REPEATS} matmuls, "
               f"{MATMUL_SIZE}^3 in fp32 and {probe.get('bf16_matmul_size', MATMUL_SIZE)}^3 under bf16 autocast "
               f"(bf16 units: {units}); memory: the 24 GiB development box")


def builtin_catalog() -> dict[str, Accelerator]:
    """The datasheet entries and this machine's probed `CPU`."""
    return {**DATASHEET_CATALOG, "CPU": probed_cpu()}


def __getattr__(name: str) -> dict[str, Accelerator]:
    """`BUILTIN_CATALOG` is `builtin_catalog()`, built on use (PEP 562), so importing the
    catalog never runs the probe."""
    if name == "BUILTIN_CATALOG":
        return builtin_catalog()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_catalog(extra_yaml: str | Path | None = None) -> dict[str, Accelerator]:
    """The built-in catalog, extended/overridden by a YAML mapping NAME -> Accelerator fields."""
    catalog = builtin_catalog()
    if extra_yaml is None:
        return catalog
    path = Path(extra_yaml)
    if not path.is_file():
        raise ConfigError(f"{path}: hardware catalog not found")
    try:
        entries = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}".replace("\n", " ")) from None
    if not isinstance(entries, dict):
        raise ConfigError(f"{path}: expected a mapping of accelerator name -> fields")
    for name, fields in entries.items():
        catalog[str(name)] = validate_config(Accelerator, fields, f"{path}: {name}")
    return catalog


def _normal(name: str) -> str:
    """Case, spaces, dashes, underscores and a vendor prefix do not tell accelerators apart:
    `h100_sxm` and `NVIDIA H100-SXM` are `H100-SXM`."""
    return "".join(ch for ch in name.lower() if ch.isalnum()).removeprefix("nvidia")


# Names people type for a catalog entry (normalised by `_normal`), beyond its own name.
ALIASES = {"h100": "H100-SXM", "h100sxm5": "H100-SXM", "h10080gb": "H100-SXM", "h100sxm80gb": "H100-SXM",
           "h100pcie80gb": "H100-PCIe", "h200sxm": "H200", "h200141gb": "H200", "a10040g": "A100-40GB",
           "a10080g": "A100-80GB", "a100sxm40gb": "A100-40GB", "a100sxm80gb": "A100-80GB", "v4": "TPU-v4",
           "b200sxm": "B200"}
AMBIGUOUS = {"a100": ("A100-40GB", "A100-80GB")}


def resolve_name(catalog: dict[str, Accelerator], name: str) -> str:
    """The catalog entry `name` means: itself, the entry equal to it ignoring case and
    punctuation, or the entry of a common alias (`h100` -> `H100-SXM`)."""
    if name in catalog:
        return name
    wanted = _normal(name)
    same = [key for key in catalog if _normal(key) == wanted]
    if len(same) == 1:
        return same[0]
    if wanted in ALIASES and ALIASES[wanted] in catalog:
        return ALIASES[wanted]
    if wanted in AMBIGUOUS:
        raise ConfigError(f"--gpu: {name!r} is ambiguous; say which: {' or '.join(AMBIGUOUS[wanted])}")
    raise ConfigError(f"--gpu: unknown accelerator {name!r}; known: {', '.join(sorted(catalog))}")
