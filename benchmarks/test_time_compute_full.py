"""Test-time compute at n = 1 ... 64 against the GRPO model, on the arithmetic task (the full run
of `compare_test_time_compute`; the pipeline runs it at n <= 8 within the demo's budget).

After `make demo` and `make rl-demo` (which trains the reward model): evaluates the arithmetic
SFT model with N = 64 samples per problem (pass@k, best-of-n by the verifier, by mean log-prob
and by the reward model, majority vote, at n = 1, 2, 4, ..., 64; the calculator; two rounds of
self-reflection) and the GRPO model with the same settings, then compares them at equal
compute with GRPO's training FLOPs amortised over `compare_test_time_compute.query_volumes`.
Artifacts go to artifacts/test_time_compute_full/ (the pipeline's own artifacts are untouched).

    make test-time-compute-full      # or: .venv/bin/python benchmarks/test_time_compute_full.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.eval.accuracy import evaluate_accuracy  # noqa: E402
from components.eval.compare import compare_test_time_compute  # noqa: E402
from flows.params import load_params  # noqa: E402

POWERS = [1, 2, 4, 8, 16, 32, 64]


def main() -> None:
    params = load_params(ROOT / "params.yaml")
    artifacts = ROOT / params.artifacts_root
    out = artifacts / "test_time_compute_full"
    full = params.evaluate_arithmetic.model_copy(update={
        "samples_per_problem": 64, "ks": POWERS, "ns": POWERS, "reflection_rounds": 2, "batch_prompts": 4})
    reward_model = artifacts / "reward_model"
    dataset = str(artifacts / "arithmetic_task/test.jsonl")
    started = time.perf_counter()
    timings = {}
    for name, model in (("sft", "arithmetic_sft"), ("grpo", "grpo")):
        step = time.perf_counter()
        evaluate_accuracy(full, str(artifacts / model), dataset, str(out / name),
                          reward_model=str(reward_model) if reward_model.is_dir() else None)
        timings[name] = round(time.perf_counter() - step, 1)
    compare_test_time_compute(params.compare_test_time_compute, str(out / "sft"), str(out / "compare"),
                              rl_evaluation=str(out / "grpo"))
    print((out / "compare/report.md").read_text(encoding="utf-8"))
    print(f"evaluations: {timings} s; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
