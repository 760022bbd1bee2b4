"""Test-time compute on the procedural arithmetic task (no peer tool: a measurement).

Fine-tunes the demo's pretrained model (`make demo` first: artifacts/pretrain, artifacts/tokenizer)
on two-step arithmetic problems and evaluates greedy, pass@k, best-of-n, majority vote, the
calculator and self-reflection on held-out problems. Artifacts go to artifacts/arithmetic/.

    .venv/bin/python benchmarks/arithmetic_test_time_compute.py
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from components.data.arithmetic import ArithmeticTaskConfig, arithmetic_task  # noqa: E402
from components.data.sft_data import SFTDataConfig, sft_data  # noqa: E402
from components.eval.accuracy import AccuracyConfig, evaluate_accuracy  # noqa: E402
from components.train.engine import TrainConfig  # noqa: E402
from components.train.loop import OptimConfig  # noqa: E402
from components.train.sft import SFTConfig, sft  # noqa: E402


def main() -> None:
    out = ROOT / "artifacts" / "arithmetic"
    started = time.perf_counter()
    arithmetic_task(ArithmeticTaskConfig(train_problems=4000, test_problems=200, max_steps=2, max_operand=20),
                    str(out / "task"))
    sft_data(SFTDataConfig(seq_len_tokens=512), str(out / "task/train.jsonl"), str(ROOT / "artifacts/tokenizer"),
             str(out / "sft_data"))
    trained = sft(SFTConfig(train=TrainConfig(max_steps=300, batch_size_rows=8, checkpoint_every_steps=0, optim=OptimConfig(
        learning_rate=2e-3, warmup_steps=20, weight_decay=0.0))), str(out / "sft_data"), str(ROOT / "artifacts/pretrain"),
        str(out / "sft"))
    evaluation = evaluate_accuracy(AccuracyConfig(max_problems=50, samples_per_problem=4, ks=[1, 4], ns=[1, 2, 4],
                                                  max_new_tokens=64, reflection_rounds=1, temperature=0.7),
                                   str(out / "sft"), str(out / "task/test.jsonl"), str(out / "evaluation"))
    print(json.dumps({"sft_final_loss": trained.metrics["final_loss"], **evaluation.metrics,
                      "wall_s": round(time.perf_counter() - started, 1)}, indent=2))
    print((out / "evaluation/report.md").read_text())


if __name__ == "__main__":
    main()
