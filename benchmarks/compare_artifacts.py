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
from pathlib import Path

TIMING = re.compile(r"(time|_s$|per_s|mfu|memory|elapsed|seconds|started|finished|wall)", re.I)

def norm(path: Path, root: Path) -> str:
    return re.sub(r"\.runs/[0-9a-f]{16}/", ".runs/<key>/", str(path.relative_to(root)))

def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()

def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if not TIMING.search(k)}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value

def main(a: str, b: str) -> int:
    ra, rb = Path(a), Path(b)
    bad = 0
    models_a = {norm(p, ra): sha(p) for p in ra.rglob("*.safetensors")}
    models_b = {norm(p, rb): sha(p) for p in rb.rglob("*.safetensors")}
    print("| model file | before sha256 | after sha256 | equal |\n|---|---|---|---|")
    for name in sorted(set(models_a) | set(models_b)):
        x, y = models_a.get(name, "-"), models_b.get(name, "-")
        bad += x != y
        print(f"| {name} | {x[:16]} | {y[:16]} | {'yes' if x == y else 'NO'} |")
    metrics_a = {norm(p, ra): p for p in ra.rglob("metrics.json") if "checkpoints" not in str(p)}
    metrics_b = {norm(p, rb): p for p in rb.rglob("metrics.json") if "checkpoints" not in str(p)}
    print("\n| metrics file | keys compared | equal |\n|---|---:|---|")
    for name in sorted(set(metrics_a) | set(metrics_b)):
        if name not in metrics_a or name not in metrics_b:
            bad += 1; print(f"| {name} | missing on one side | NO |"); continue
        x, y = strip(json.loads(metrics_a[name].read_text())), strip(json.loads(metrics_b[name].read_text()))
        equal = x == y
        bad += not equal
        print(f"| {name} | {len(x) if isinstance(x, dict) else 1} | {'yes' if equal else 'NO'} |")
        if not equal and isinstance(x, dict):
            for k in sorted(set(x) | set(y)):
                if x.get(k) != y.get(k):
                    print(f"    {k}: {x.get(k)!r} != {y.get(k)!r}")
    man_a = {norm(p, ra): p for p in ra.rglob("manifest.json") if "checkpoints" not in str(p)}
    man_b = {norm(p, rb): p for p in rb.rglob("manifest.json") if "checkpoints" not in str(p)}
    print("\n| manifest metrics | keys compared | equal |\n|---|---:|---|")
    for name in sorted(set(man_a) | set(man_b)):
        if name not in man_a or name not in man_b:
            bad += 1; print(f"| {name} | missing on one side | NO |"); continue
        x = strip(json.loads(man_a[name].read_text()).get("metrics", {}))
        y = strip(json.loads(man_b[name].read_text()).get("metrics", {}))
        bad += x != y
        print(f"| {name} | {len(x)} | {'yes' if x == y else 'NO'} |")
        if x != y:
            for k in sorted(set(x) | set(y)):
                if x.get(k) != y.get(k):
                    print(f"    {k}: {x.get(k)!r} != {y.get(k)!r}")
    logs_a = {norm(p, ra): p for p in ra.rglob("*.jsonl") if ".runs/" not in str(p)}
    logs_b = {norm(p, rb): p for p in rb.rglob("*.jsonl") if ".runs/" not in str(p)}
    print("\n| step log (jsonl) | records | equal |\n|---|---:|---|")
    for name in sorted(set(logs_a) | set(logs_b)):
        if name not in logs_a or name not in logs_b:
            bad += 1; print(f"| {name} | missing on one side | NO |"); continue
        x = [strip(json.loads(line)) for line in logs_a[name].read_text().splitlines()]
        y = [strip(json.loads(line)) for line in logs_b[name].read_text().splitlines()]
        bad += x != y
        print(f"| {name} | {len(x)} | {'yes' if x == y else 'NO'} |")
    print(f"\n{bad} differences")
    return 1 if bad else 0

if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
