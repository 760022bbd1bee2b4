"""Matmul throughput in fp32 and under bf16 autocast on this CPU, by size: how much slower bf16 is
where the CPU has no bf16 matrix unit (AMX, AVX512-BF16) and oneDNN emulates it.

    .venv/bin/python benchmarks/bf16_emulation.py [--sizes 256 512 1024 2048] [--repeats 3] [--threads 2]

Work: a seeded [n, n] @ [n, n] fp32 matmul (2 n^3 FLOP), plain and under
`torch.autocast("cpu", bfloat16)` (casts included, as a training step pays them), one warm-up then
--repeats timed runs per size and precision: median and range of TFLOP/s. Waits for an idle machine
first and records other processes' load.

Writes benchmarks/bf16_emulation.json and .md (git commit recorded).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._load import wait_idle  # noqa: E402
from benchmarks._provenance import written_by  # noqa: E402
from components.artifacts import code_version  # noqa: E402
from components.feasibility.cpu_probe import cpu_model_name, matmul_seconds  # noqa: E402
from components.models.precision import this_cpu_bf16_units  # noqa: E402

OUT = Path(__file__).with_name("bf16_emulation")


def tflops(size: int, precision: str, repeats: int) -> list[float]:
    return [2 * size**3 / seconds / 1e12 for seconds in matmul_seconds(size, precision, repeats)]


def markdown(report: dict[str, Any]) -> str:
    code = report["code"]
    lines = ["# bf16 autocast vs fp32 matmuls on this CPU", "",
             f"{written_by('benchmarks/bf16_emulation.py', code)}; "
             f"{report['device']}, torch {report['torch']}, {report['threads']} threads; other load before: "
             f"{report['other_cores_before']:.2f} cores. {report['repeats']} timed runs per cell after a warm-up.", "",
             "| n | fp32 TFLOP/s median (range) | bf16 autocast TFLOP/s median (range) | fp32 / bf16 |",
             "|---:|---|---|---:|"]
    for row in report["sizes"]:
        fp32, bf16 = row["fp32"], row["bf16"]
        lines.append(f"| {row['n']} | {fp32['median']:.4f} ({fp32['min']:.4f}-{fp32['max']:.4f}) | "
                     f"{bf16['median']:.4f} ({bf16['min']:.4f}-{bf16['max']:.4f}) | "
                     f"{fp32['median'] / bf16['median']:.0f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "code": code_version().model_dump(), "torch": torch.__version__, "threads": args.threads,
        "device": f"{cpu_model_name()} (bf16 units: {', '.join(this_cpu_bf16_units()) or 'none'})",
        "repeats": args.repeats, "other_cores_before": wait_idle(600), "sizes": []}
    for n in args.sizes:
        row: dict[str, Any] = {"n": n}
        for precision in ("fp32", "bf16"):
            rates = tflops(n, precision, args.repeats)
            row[precision] = {"median": statistics.median(rates), "min": min(rates), "max": max(rates)}
        report["sizes"].append(row)
        print(row, flush=True)
    OUT.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    OUT.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
