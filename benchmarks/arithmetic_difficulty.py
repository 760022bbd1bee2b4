"""How hard should the arithmetic task be for a real instruct model? Greedy accuracy of an imported
model on the task's VALIDATION split at several difficulty settings (the test split is never read).

    .venv/bin/python benchmarks/arithmetic_difficulty.py [--model artifacts/import_model] [--problems 100]

The real chain (`params.yaml` section `real_arithmetic_task`) uses the setting whose accuracy lies
in the 20-60 % band the issue asks for, so GRPO has room to improve and a signal to learn from.
Decoding: `components.models.sampling.decode`, greedy, the model's own chat template, up to 128
new tokens, bf16 autocast (as the chain evaluates). Verdicts: `components.tasks.verifiers.is_correct`.
Accuracy with its 95 % Wilson interval (`components.eval.intervals`). Writes
benchmarks/arithmetic_difficulty.{json,md} with the commit.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

SETTINGS = {  # name -> ArithmeticTaskConfig fields (validation split drawn as the chain draws it)
    "1 step, + - x, 2..20 (the chain's)": {"min_steps": 1, "max_steps": 1},
    "1-2 steps, + - x, 2..20": {"min_steps": 1, "max_steps": 2},
    "1-3 steps, + - x, 2..20 (the demo's)": {"min_steps": 1, "max_steps": 3},
}
OUT = Path(__file__).resolve().parent / "arithmetic_difficulty"


def accuracy(model, tokenizer, problems: list[dict], batch: int) -> tuple[int, float]:
    import torch

    from components.models.chat import prompt_ids
    from components.models.sampling import decode
    from components.tasks.verifiers import is_correct

    correct, started = 0, time.perf_counter()
    for start in range(0, len(problems), batch):
        chunk = problems[start:start + batch]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rollout = decode(model, tokenizer, [prompt_ids(tokenizer, p["question"]) for p in chunk], 1, 128, 0.0)
        correct += sum(is_correct(text, p["answer"]) for text, p in zip(rollout.texts, chunk))
    return correct, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="artifacts/import_model")
    parser.add_argument("--problems", type=int, default=100)
    parser.add_argument("--batch", type=int, default=50)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from components.eval.intervals import wilson_interval
    from components.models.factory import load_causal_lm
    from components.tasks.arithmetic import ArithmeticTaskConfig, generate

    model, tokenizer = load_causal_lm(args.model).eval(), AutoTokenizer.from_pretrained(args.model)
    rows = []
    for name, fields in SETTINGS.items():
        config = ArithmeticTaskConfig(**fields, train_problems=2000, validation_problems=200, test_problems=200)
        problems = generate(config)["validation"][:args.problems]
        correct, seconds = accuracy(model, tokenizer, problems, args.batch)
        low, high = wilson_interval(correct, len(problems))
        rows.append({"setting": name, "fields": fields, "problems": len(problems), "correct": correct,
                     "accuracy": correct / len(problems), "ci95": [low, high], "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True).stdout.strip())
    OUT.with_suffix(".json").write_text(json.dumps({"commit": commit, "dirty": dirty, "model": args.model,
                                                    "rows": rows}, indent=2) + "\n")
    lines = [f"# Arithmetic task difficulty: greedy accuracy of `{args.model}` on validation problems", "",
             f"Commit {commit}{' (uncommitted changes)' if dirty else ''}; bf16 autocast, greedy, 128 new tokens.", "",
             "| setting | problems | accuracy | 95 % CI | seconds |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['setting']} | {r['problems']} | {100 * r['accuracy']:.1f} % | "
              f"[{100 * r['ci95'][0]:.1f}, {100 * r['ci95'][1]:.1f}] | {r['seconds']} |" for r in rows]
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
