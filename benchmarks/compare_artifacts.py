"""Compare two demo `artifacts/` trees, before and after a change that must not change behaviour:
the sha256 of every model.safetensors (checkpoints included; a run directory's cache-key
folder is matched by position, since a config change may rename it), and every metrics.json,
manifest's `metrics` and jsonl file (step logs, held-out curves, samples, task splits) with
timing fields (names with time, _s, per_s, mfu, memory, elapsed, ...) removed. Prints
markdown tables and exits 1 on any difference.

    .venv/bin/python benchmarks/compare_artifacts.py BEFORE/artifacts AFTER/artifacts
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

TIMING = re.compile(r"(time|_s$|per_s|mfu|memory|elapsed|seconds|started|finished|wall)", re.I)
Loader = Callable[[Path], Any]


def norm(path: Path, root: Path) -> str:
    return re.sub(r"\.runs/[0-9a-f]{16}/", ".runs/<key>/", str(path.relative_to(root)))


def strip(value: Any) -> Any:
    """`value` without timing fields, at any depth."""
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def metrics_json(path: Path) -> Any:
    return strip(json.loads(path.read_text()))


def manifest_metrics(path: Path) -> Any:
    return strip(json.loads(path.read_text()).get("metrics", {}))


def jsonl_records(path: Path) -> Any:
    return [strip(json.loads(line)) for line in path.read_text().splitlines()]


def size(value: Any) -> str:
    return f"{value[:16]}" if isinstance(value, str) else str(len(value))


def compare(title: str, before: Path, after: Path, pattern: str, skip: str, load: Loader) -> int:
    """One markdown table: each file matching `pattern` (not under `skip`) loaded on both sides."""
    sides = [{norm(p, root): p for p in root.rglob(pattern) if skip not in str(p)} for root in (before, after)]
    print(f"\n| {title} | before | after | equal |\n|---|---|---|---|")
    differences = 0
    for name in sorted(set(sides[0]) | set(sides[1])):
        x, y = (load(side[name]) if name in side else None for side in sides)
        differences += x is None or x != y
        shown = [size(v) if v is not None else "missing" for v in (x, y)]
        print(f"| {name} | {shown[0]} | {shown[1]} | {'yes' if x is not None and x == y else 'NO'} |")
    return differences


def main(before: str, after: str) -> int:
    roots = Path(before), Path(after)
    differences = (compare("model file (sha256)", *roots, "*.safetensors", "<none>", sha256)
                   + compare("metrics.json (keys)", *roots, "metrics.json", "checkpoints", metrics_json)
                   + compare("manifest metrics (keys)", *roots, "manifest.json", "checkpoints", manifest_metrics)
                   + compare("jsonl (records)", *roots, "*.jsonl", ".runs/", jsonl_records))
    print(f"\n{differences} differences")
    return 1 if differences else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
