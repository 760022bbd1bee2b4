"""Print the family table and write families.{json,md} here: for every decoder family the
factory builds (tests/test_families.py's small random-initialised configs and tiny tokenizer),
its parameter count, the sampler path `decode` takes, whether greedy `decode` equals
transformers' `generate` token for token, and the largest log-prob difference from
transformers' forward of each of our log-prob paths. The figures come from the test module's
own helpers, so they are what the tests assert on.

    .venv/bin/python benchmarks/families.py
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from components.models.chat import prompt_ids  # noqa: E402
from components.models.fast_llama import supports  # noqa: E402
from components.models.sampling import decode  # noqa: E402
from components.tasks.arithmetic import ArithmeticTaskConfig, generate  # noqa: E402
from tests.conftest import build_tiny_lm  # noqa: E402
from tests.test_families import FAMILIES, generate_greedy, load, logprob_differences, model_dir  # noqa: E402

NEW_TOKENS = 16


def measure(root: Path, family: str, questions: list[str]) -> dict[str, object]:
    model, tokenizer = load(model_dir(root, family))
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    rollout = decode(model, tokenizer, prompts, 1, NEW_TOKENS, 0.0)
    expected = generate_greedy(model, tokenizer, prompts, NEW_TOKENS)
    lengths = rollout.completion_mask.sum(1).long().tolist()
    equal = all(rollout.input_ids[row, rollout.prompt_width:][:n].tolist() == expected[row, :n].tolist()
                for row, n in enumerate(lengths))
    differences = logprob_differences(model, tokenizer, prompts[:3])
    return {"family": family, "params": sum(p.numel() for p in model.parameters()),
            "sampler": "fast_llama" if supports(model) else "transformers", "greedy_equal": equal,
            "greedy_tokens_compared": sum(lengths), **{f"max_diff_{k}": v for k, v in differences.items()}}


def markdown(rows: list[dict[str, object]]) -> str:
    lines = ["| family | params | sampler path | greedy = generate | log-prob max diff: RL (completion) | "
             "GRPO shared-prompt | DPO (per token) | supervised head (logits) |", "|---" * 8 + "|"]
    for r in rows:
        shared = f"{r['max_diff_shared_prompt']:.1e}" if "max_diff_shared_prompt" in r else "n/a (transformers)"
        lines.append(f"| {r['family']} | {r['params']:,} | {r['sampler']} | "
                     f"{'yes' if r['greedy_equal'] else 'NO'} ({r['greedy_tokens_compared']} tokens) | "
                     f"{r['max_diff_completion']:.1e} | {shared} | {r['max_diff_sequence']:.1e} | "
                     f"{r['max_diff_head']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build_tiny_lm(root)
        splits = generate(ArithmeticTaskConfig(train_problems=16, test_problems=4, max_steps=1, max_operand=9))
        questions = [row["question"] for row in splits["test"]]
        rows = [measure(root, family, questions) for family in FAMILIES]
    (HERE / "families.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    table = markdown(rows)
    (HERE / "families.md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
