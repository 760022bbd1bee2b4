"""Peak memory of the 135M SFT run (sft_135m.py's `ours` side) against the feasibility estimate.

    .venv/bin/python benchmarks/sft_135m_memory.py [--model DIR] [--precision bf16|fp32] [--steps 2]
        [--batch-size 8] [--max-length 512] [--examples 400] [--threads 2] [--out PREFIX]

The estimator (`components.feasibility.estimate`, the plan sft_135m.py gives it) predicts the bytes
of the tensors a training step holds: weights, gradients, optimizer states and activations. On a GPU
that is what `torch.cuda.max_memory_allocated` measures. A CPU has no such counter, so this script
counts the same thing from the allocator's own events: torch's profiler with `profile_memory=True`
records every CPU tensor allocation and free (size and time); the live bytes at the start (the
fp32 weights and the data) plus the highest running sum of those events over --steps optimizer
steps is the peak of tensor memory, the CPU's `max_memory_allocated`. The steps are the ones
sft_135m.py times (`components.train.engine.train` on the same packed GSM8K chats, same settings).

Reported beside it, not compared: the process's peak RSS (ru_maxrss) and its RSS before the model
loaded. RSS also holds the interpreter and libraries, the safetensors file mapped while loading,
freed memory glibc keeps for reuse, and oneDNN's scratch buffers, none of which are tensors.

Writes PREFIX.json and PREFIX.md (default benchmarks/sft_135m_memory), with the commit and command.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._real_model import add_run_args, markdown_head, model_dir, report_head, write_report  # noqa: E402
from benchmarks.sft_135m import BETAS, GIB, GRAD_CLIP_NORM, WEIGHT_DECAY, _rss_bytes, chats, load_model  # noqa: E402
from benchmarks.sft_135m import memory_estimate  # noqa: E402


def tensor_bytes(tensors: list[Any]) -> int:
    """Bytes of the distinct storages behind `tensors`."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def peak_allocation_delta(profiler: Any) -> tuple[int, int]:
    """(highest running sum, final sum) of the CPU allocation events `profiler` recorded, in bytes:
    each event's size is positive for an allocation and negative for a free."""
    from torch._C._profiler import _EventType

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    running = peak = 0
    for _, size in sorted(events):
        running += size
        peak = max(peak, running)
    return peak, running


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Train --steps steps of sft_135m.py's `ours` side under the profiler; the tensor-memory peak."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoTokenizer

    from components.data.sft_pack import pack_sft
    from components.feasibility.model_flops import training_flops_per_token
    from components.models.chat import chat_example
    from components.train.batches import TrainData
    from components.train.config import TrainConfig
    from components.train.engine import train
    from components.train.modules import CausalLMLoss
    from components.train.optim import OptimConfig

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    pad = tokenizer.pad_token_id
    packed = pack_sft([chat_example(tokenizer, q, a) for q, a in chats(args.examples)], args.max_length, pad)
    columns = {name: torch.tensor(packed[name]) for name in ("input_ids", "labels", "position_ids")}
    rss_before_model = _rss_bytes()
    model = load_model(args.model)
    config = TrainConfig(
        max_steps=args.steps, batch_size_rows=args.batch_size, seed=args.seed, checkpoint_every_steps=0,
        precision=args.precision, gradient_checkpointing=False,
        optim=OptimConfig(learning_rate=1e-5, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
                          warmup_steps=0, lr_schedule="constant", grad_clip_norm=GRAD_CLIP_NORM))
    live_at_start = tensor_bytes([*model.parameters(), *model.buffers(), *columns.values()])
    data = TrainData(columns, pad_token_id=pad, source="gsm8k")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sft-135m-memory-") as run_dir, \
            profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        train(CausalLMLoss(model), data, config, Path(run_dir), save_model=lambda module, directory: None,
              flops_per_token=training_flops_per_token(model, args.max_length), description="sft")
    peak_delta, final_delta = peak_allocation_delta(profiler)
    return {"live_at_start_gib": live_at_start / GIB, "peak_allocation_delta_gib": peak_delta / GIB,
            "tensor_peak_gib": (live_at_start + peak_delta) / GIB, "live_at_end_gib": (live_at_start + final_delta) / GIB,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "rss_before_model_gib": rss_before_model / GIB, "seconds": round(time.perf_counter() - started, 1)}


def render(report: dict[str, Any]) -> str:
    m, e = report["measured"], report["estimate"]
    ratio = e["total"] / m["tensor_peak_gib"]
    lines = markdown_head("SFT of SmolLM2-135M: feasibility estimate vs measured peak memory", "sft_135m_memory.py",
                          report)
    lines += ["", "| quantity | GiB |", "|---|---:|",
              f"| estimate: weights {e['weights']:.3f} + gradients {e['gradients']:.3f} + optimizer "
              f"{e['optimizer_states']:.3f} + activations {e['activations']:.3f} | {e['total']:.3f} |",
              f"| measured tensor peak (live at start {m['live_at_start_gib']:.3f} + highest allocation sum "
              f"{m['peak_allocation_delta_gib']:.3f}) | {m['tensor_peak_gib']:.3f} |",
              f"| tensors live after the run (weights and data; train() has freed gradients and AdamW states) "
              f"| {m['live_at_end_gib']:.3f} |",
              f"| peak RSS (not compared; RSS before the model loaded {m['rss_before_model_gib']:.3f}) "
              f"| {m['peak_rss_gib']:.3f} |",
              "", f"Estimate / measured tensor peak: **{ratio:.3f}** ({(ratio - 1) * 100:+.1f} %); "
              f"estimate / peak RSS: {e['total'] / m['peak_rss_gib']:.3f}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples", type=int, default=400, help="First N GSM8K train problems.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", type=Path, default=HERE / "sft_135m_memory", help="Writes OUT.json and OUT.md.")
    args = parser.parse_args()
    args.steps = max(args.steps, 2)  # the second step is the first with AdamW's states already allocated
    args.model = model_dir(args.model)
    args.warmup = 0
    report = {**report_head("benchmarks/sft_135m_memory.py", args, ()), "estimate": memory_estimate(args.model, args),
              "measured": measure(args)}
    write_report(args.out, report, render(report))


if __name__ == "__main__":
    main()
