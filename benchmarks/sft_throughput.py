"""SFT training throughput and memory: crucible's trainer vs TRL 1.16's `SFTTrainer`, same model, same data.

    .venv/bin/python benchmarks/sft_throughput.py [--examples 2000] [--effective-tokens 100000]
        [--batch-size 8] [--max-length 512] [--lr 5e-4] [--threads 2] [--gradient-checkpointing]
        [--sides ours,trl-default,trl-wrapped,trl-bfd]

Everything is local (no hub): a 2,048-token byte-level BPE is trained with
`components.data.tokenizer` on the 7,473 GSM8K train problems rendered as
"Question: {question}\\nAnswer: {answer}" and cached in benchmarks/.cache/ (git-ignored); the
model is a freshly initialised tiny Llama (hidden 256, 4 layers, 4 heads, SwiGLU 688, vocab =
len(tokenizer), 512 positions, tied embeddings, SDPA attention, fp32) built by
`components.models.factory.build_causal_lm` after `torch.manual_seed(--seed)`, so both sides start
from the same weights.

Data. The first --examples GSM8K train problems as TRL conversational prompt-completion pairs:
prompt = [{"role": "user", "content": question}], completion = [{"role": "assistant", "content":
answer}]. TRL applies the ChatML chat template and, by default for prompt-completion data, trains on
the completion only (completion_only_loss=None -> True).

Sides (each in its own subprocess, re-invoking this script with --side, so peak RSS is per side):
  ours         run_ours() below: filled in by the trainer author (tokenize_chat / pack_sft + our loop).
  trl-default  SFTTrainer defaults: no packing, each batch padded to its longest sequence.
  trl-wrapped  packing=True, packing_strategy="wrapped": the token stream is cut into max_length
               rows, examples are split across rows and attend across example boundaries.
  trl-bfd      packing=True, packing_strategy="bfd": best-fit-decreasing packing, padding-free (the
               batch is flattened into one row; the position ids restart per example and
               transformers builds a block-diagonal mask from them for SDPA). Not representative
               here: TRL supports padding-free only with FlashAttention 2 or 3 (see
               `not_representative`), which a CPU does not have, so this side is reported but
               kept out of the ratios.

Fairness. Every side trains until it has processed --effective-tokens non-padding tokens (the step
that crosses the budget is the last one), so every side does the same amount of useful work and the
losses are compared after the same number of effective tokens; throughput is a rate over the tokens
actually processed, so the small overshoot does not bias it. Same batch size (--batch-size rows per
optimizer step, no gradient accumulation), same max_length, same threads (torch.set_num_threads and
OMP/MKL_NUM_THREADS in every child), fp32 on CPU. Optimizer: AdamW, lr --lr, betas (0.9, 0.95),
eps 1e-8, weight decay 0.1 on matrices only (both TRL's Trainer and our make_optimizer exclude norms
and biases; Llama has no biases), constant learning rate with no warmup (so schedule conventions
cannot differ), global grad-norm clipping at 1.0 (TRL runs torch's fused AdamW kernel, transformers'
default optim for torch >= 2.8). Gradient checkpointing is OFF on both sides unless
--gradient-checkpointing (TRL 1.16 turns it on by default; it trades ~20-30% compute for activation
memory, which would confound both throughput and RSS). Every other TRL setting is its default
(logging every 10 steps, entropy / token-accuracy metrics, random sampler with seed 42,
dataloader_num_workers=0), apart from report_to="none", save_strategy="no", no eval, use_cpu=True,
bf16=False.

Measured, per side: wall time of the training loop only (TRL: `trainer.train()`; model build and
dataset tokenization/packing happen before and are excluded), tokens per step (total =
input_ids.numel() including padding; effective = attention_mask.sum(), or every token in the
padding-free batch; loss tokens = shifted labels != -100), tokens/s, peak RSS of the child process
(lifetime, and sampled every 10 ms during training), the per-step loss against cumulative effective
tokens, and the final loss (mean of the last 5 steps). The parent prints a markdown table, ratios
ours / each TRL configuration, the loss of every side at common effective-token checkpoints (mean of
the step losses in the 10% of the budget before the checkpoint), and writes sft_throughput.{json,md}
next to this script.

Busy machines. With --threads equal to the core count, any other process running at the same time
slows a side several-fold (OpenMP threads wait for a descheduled peer). Each side therefore records
the CPU time other processes took while it trained, overall ("other load", in cores) and per step;
the parent waits up to --max-wait-idle seconds for an idle machine before each side and reruns a
side (up to --retries times) whose other load exceeded 0.1 cores, and the report flags what is still
contaminated. "clean eff tok/s" counts only steps with no other load. On an idle 2-core machine the
default run takes about 2.5 minutes (TRL sides ~45 + 30 + 55 s, plus ours).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GSM8K = ROOT / "data" / "raw" / "gsm8k" / "train.jsonl"
CACHE = HERE / ".cache"
MIB = 1024 * 1024

SIDES = ("ours", "trl-default", "trl-wrapped", "trl-bfd")
TRL_SIDES = {  # side -> SFTConfig packing fields
    "trl-default": {"packing": False},
    "trl-wrapped": {"packing": True, "packing_strategy": "wrapped"},
    "trl-bfd": {"packing": True, "packing_strategy": "bfd"},
}

# Optimizer settings shared by every side (see the docstring).
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.1
GRAD_CLIP_NORM = 1.0
FINAL_LOSS_STEPS = 5  # final loss = mean of the last this many step losses
CHECKPOINT_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
BUSY_CORES = 0.1  # 'other load' above this many cores flags a contaminated timing
CHECKPOINT_WINDOW = 0.1  # loss at a checkpoint = mean over steps in the last 10% of the budget before it

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._load import process_cpu_s, run_child, system_busy_s, wait_idle  # noqa: E402
from benchmarks._provenance import written_by  # noqa: E402
from components.artifacts import code_version  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Shared setup: tokenizer, examples, model (both sides use these)
# ---------------------------------------------------------------------------------------------


def _gsm8k_rows() -> list[dict[str, Any]]:
    from components.records import read_jsonl

    return [record for _, record in read_jsonl(GSM8K)]


def tokenizer_dir(vocab_size: int) -> Path:
    """The cached tokenizer for this vocabulary size and this GSM8K file."""
    digest = hashlib.sha256(GSM8K.read_bytes()).hexdigest()[:12]
    return CACHE / f"tokenizer-gsm8k-{digest}-v{vocab_size}"


def ensure_tokenizer(vocab_size: int) -> Path:
    """Train the byte-level BPE (components.data.tokenizer) on GSM8K train once; reuse it after."""
    out = tokenizer_dir(vocab_size)
    if (out / "tokenizer.json").exists():
        return out
    from components.records import write_shards
    from components.data.tokenizer import TokenizerConfig, _build

    texts = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in _gsm8k_rows()]
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tok-", dir=CACHE))
    try:
        write_shards(work / "dataset", {"text": texts}, rows_per_shard=len(texts))
        staging = work / "tokenizer"
        staging.mkdir()
        stats = _build(TokenizerConfig(vocab_size=vocab_size), work / "dataset", staging)
        (staging / "build_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        if out.exists():  # a concurrent run got there first
            return out
        staging.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def load_tokenizer(vocab_size: int):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir(vocab_size)))


def load_examples(n: int) -> list[dict[str, list[dict[str, str]]]]:
    """The first `n` GSM8K train problems as conversational prompt-completion pairs."""
    rows = _gsm8k_rows()[:n]
    return [
        {
            "prompt": [{"role": "user", "content": row["question"]}],
            "completion": [{"role": "assistant", "content": row["answer"]}],
        }
        for row in rows
    ]


def build_model(tokenizer, seed: int):
    """The tiny Llama, seeded: identical weights on every side."""
    import torch

    from components.models.factory import ModelConfig, build_causal_lm

    torch.manual_seed(seed)
    config = ModelConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=688,
                         max_position_embeddings=512, tie_word_embeddings=True)
    model = build_causal_lm(config, tokenizer)
    model.set_attn_implementation("sdpa")
    return model.float()


def set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Measurement, shared by both sides
# ---------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _lifetime_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class Recorder:
    """Per-step token counts, losses and times, plus RSS, for one side.

    Call `start()` right before the training loop, `begin_step()` before and `step(...)` after
    every optimizer step (its forward, backward, clipping and update), `stop()` right after the
    loop, then `result()`. `done()` says whether the effective-token budget is reached (the
    trainer should stop after that step). Each step also records how much CPU other processes
    took meanwhile, so steps slowed by a busy machine can be left out ("clean" rates).
    """

    def __init__(self, budget_effective_tokens: int, sample_every_s: float = 0.01):
        self.budget = budget_effective_tokens
        self.steps: list[dict[str, Any]] = []
        self.cum_total = self.cum_effective = self.cum_loss_tokens = self.sequences = 0
        self._sample_every_s = sample_every_s
        self._peak_train_rss = 0
        self._sampling = threading.Event()
        self._thread: threading.Thread | None = None
        self.train_s = 0.0
        self.rss_before_train = 0
        self.peak_rss_before_train = 0

    def _sample(self) -> None:
        import psutil

        process = psutil.Process()
        while not self._sampling.wait(self._sample_every_s):
            self._peak_train_rss = max(self._peak_train_rss, process.memory_info().rss)

    def start(self) -> None:
        self._cpu_s = process_cpu_s()
        self._system_busy = system_busy_s()
        self.rss_before_train = _rss_bytes()
        self.peak_rss_before_train = _lifetime_peak_rss_bytes()
        self._peak_train_rss = self.rss_before_train
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()

    def begin_step(self) -> None:
        self._step_started = (time.perf_counter(), system_busy_s(), process_cpu_s())

    def step(self, *, total_tokens: int, effective_tokens: int, loss_tokens: int, sequences: int,
             loss: float) -> None:
        t0, busy0, cpu0 = self._step_started
        seconds = time.perf_counter() - t0
        other = max(0.0, (system_busy_s() - busy0) - (process_cpu_s() - cpu0)) / seconds
        self.cum_total += total_tokens
        self.cum_effective += effective_tokens
        self.cum_loss_tokens += loss_tokens
        self.sequences += sequences
        self.steps.append({
            "step": len(self.steps) + 1, "loss": loss, "seconds": seconds, "other_cores": other,
            "total_tokens": total_tokens, "effective_tokens": effective_tokens, "loss_tokens": loss_tokens,
            "cum_total_tokens": self.cum_total, "cum_effective_tokens": self.cum_effective,
            "cum_loss_tokens": self.cum_loss_tokens,
        })

    def done(self) -> bool:
        return self.cum_effective >= self.budget

    def stop(self) -> None:
        self.train_s = time.perf_counter() - self._started
        self.cpu_s = process_cpu_s() - self._cpu_s
        # CPU time other processes took while we trained, in cores: > ~0.1 means the timing is contaminated
        self.other_cores = max(0.0, system_busy_s() - self._system_busy - self.cpu_s) / self.train_s
        self._sampling.set()
        if self._thread is not None:
            self._thread.join()
        self._peak_train_rss = max(self._peak_train_rss, _rss_bytes())

    def result(self, **extra: Any) -> dict[str, Any]:
        n = len(self.steps)
        steady = self.steps[3:] if n > 6 else self.steps  # drop warm-up steps when there are enough
        steady_s = sum(s["seconds"] for s in steady) or float("nan")
        clean = [s for s in steady if s["other_cores"] <= BUSY_CORES]
        clean_s = sum(s["seconds"] for s in clean) or float("nan")
        losses = [s["loss"] for s in self.steps]
        return {
            "steps": n,
            "train_s": self.train_s,
            "sequences": self.sequences,
            "tokens_total": self.cum_total,
            "tokens_effective": self.cum_effective,
            "tokens_loss": self.cum_loss_tokens,
            "padding_fraction": 1 - self.cum_effective / self.cum_total if self.cum_total else None,
            "effective_tokens_per_s": self.cum_effective / self.train_s,
            "total_tokens_per_s": self.cum_total / self.train_s,
            "loss_tokens_per_s": self.cum_loss_tokens / self.train_s,
            "cpu_s": self.cpu_s,
            "effective_tokens_per_cpu_s": self.cum_effective / self.cpu_s,
            "other_processes_cores": self.other_cores,
            "steady_effective_tokens_per_s": sum(s["effective_tokens"] for s in steady) / steady_s,
            "steady_total_tokens_per_s": sum(s["total_tokens"] for s in steady) / steady_s,
            "clean_steps": len(clean),
            "clean_effective_tokens_per_s": sum(s["effective_tokens"] for s in clean) / clean_s,
            "clean_total_tokens_per_s": sum(s["total_tokens"] for s in clean) / clean_s,
            "step_s_median": sorted(s["seconds"] for s in self.steps)[n // 2] if n else None,
            "final_loss": sum(losses[-FINAL_LOSS_STEPS:]) / len(losses[-FINAL_LOSS_STEPS:]) if losses else None,
            "last_step_loss": losses[-1] if losses else None,
            "rss_before_train_mib": self.rss_before_train / MIB,
            "peak_rss_before_train_mib": self.peak_rss_before_train / MIB,
            "peak_rss_train_mib": self._peak_train_rss / MIB,
            "peak_rss_mib": _lifetime_peak_rss_bytes() / MIB,
            "trajectory": self.steps,
            **extra,
        }


# ---------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """Train with crucible's trainer; return `Recorder.result(...)`.

    The same examples are tokenized with the chat template (components.data.sft_pack.tokenize_chat,
    loss on the assistant tokens) and packed whole into args.max_length blocks with per-example
    position ids (pack_sft; transformers then keeps examples apart with a block-diagonal mask), and
    `components.train.engine.train` -- the loop every crucible trainer uses, unchanged -- runs
    args.batch_size blocks per optimizer step. The number of steps is the first at which the
    effective tokens reach the budget, found by replaying the loop's own seeded sampler; the
    recorder is fed from the loop's per-step observer (the hook the Prefect progress uses).
    """
    set_threads(args.threads)
    import torch

    from components.data.formats import SFTChat
    from components.data.sft_pack import pack_sft, tokenize_chat
    from components.train.batches import EpochSampler, TrainData
    from components.train.config import TrainConfig
    from components.train.engine import train
    from components.train.optim import OptimConfig
    from components.train.modules import CausalLMLoss
    from components.runlog import step_observer
    from components.feasibility.model_flops import training_flops_per_token

    tokenizer = load_tokenizer(args.vocab_size)
    examples = [tokenize_chat(tokenizer, SFTChat(messages=[*row["prompt"], *row["completion"]]))
                for row in load_examples(args.examples)]
    packed = pack_sft(examples, args.max_length, tokenizer.pad_token_id, truncate=True)
    columns = {name: torch.tensor(packed[name], dtype=torch.long) for name in ("input_ids", "labels", "position_ids")}
    model = build_model(tokenizer, args.seed)
    data = TrainData(columns, pad_token_id=tokenizer.pad_token_id, source="gsm8k")

    # Replay the loop's sampler to find the step that crosses the budget and each step's counts.
    sampler, per_step, effective = EpochSampler(len(data), args.batch_size, args.seed), [], 0
    while effective < args.effective_tokens:
        rows = data.rows(sampler.next_batch())
        real = int((rows["input_ids"] != tokenizer.pad_token_id).sum())
        starts = int((rows["position_ids"] == 0).sum())
        pads = int((rows["input_ids"][:, -1] == tokenizer.pad_token_id).sum())  # a padded tail is one more "start"
        per_step.append({"total_tokens": rows["input_ids"].numel(), "effective_tokens": real,
                         "loss_tokens": int((rows["labels"][:, 1:] != -100).sum()), "sequences": starts - pads})
        effective += real
    config = TrainConfig(
        max_steps=len(per_step), batch_size_rows=args.batch_size, seed=args.seed, checkpoint_every_steps=0,
        gradient_checkpointing=args.gradient_checkpointing,
        optim=OptimConfig(learning_rate=args.lr, beta1=BETAS[0], beta2=BETAS[1], weight_decay=WEIGHT_DECAY,
                          warmup_steps=0, lr_schedule="constant", grad_clip_norm=GRAD_CLIP_NORM),
    )
    rec = Recorder(args.effective_tokens)

    def observe(_trainer: str, record: dict[str, Any], _max_steps: int) -> None:
        counts = per_step[record["step"] - 1]
        assert counts["effective_tokens"] == record["tokens"], "the replayed sampler must match the loop's"
        rec.step(**counts, loss=record["loss"])
        rec.begin_step()

    token = step_observer.set(observe)
    with tempfile.TemporaryDirectory(prefix="crucible-sft-bench-") as run_dir:
        rec.start()
        rec.begin_step()
        train(CausalLMLoss(model), data, config, Path(run_dir), save_model=lambda module, directory: None,
              flops_per_token=training_flops_per_token(model, args.max_length), description="sft")
        rec.stop()
    step_observer.reset(token)
    stats = packed["stats"]
    return rec.result(side="ours", notes=[
        f"packed {stats['examples']} examples into {stats['blocks']} blocks of {args.max_length} tokens "
        f"(first-fit decreasing, {stats['truncated']} truncated); per-example position ids",
        "optimizer: torch.optim.AdamW(fused=True) via components.train.optim.make_optimizer (TRL: adamw_torch_fused, the same kernel)",
        "loss: logits only at positions with a label (the prompt tokens get no vocabulary projection)",
    ])


# ---------------------------------------------------------------------------------------------
# TRL sides
# ---------------------------------------------------------------------------------------------


def run_trl(args: argparse.Namespace, side: str) -> dict[str, Any]:
    set_threads(args.threads)
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    tokenizer = load_tokenizer(args.vocab_size)
    dataset = Dataset.from_list(load_examples(args.examples))
    model = build_model(tokenizer, args.seed)
    rec = Recorder(args.effective_tokens)

    class RecordingSFTTrainer(SFTTrainer):
        """Counts the tokens of every batch the trainer actually trains on and keeps its loss."""

        pending: dict[str, Any] = {}

        def training_step(self, model, inputs, num_items_in_batch=None):
            input_ids = inputs["input_ids"]
            if "attention_mask" in inputs:
                effective = int(inputs["attention_mask"].sum())
                sequences = input_ids.shape[0]
            else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None off Neuron)
                effective = input_ids.numel()
                sequences = int((inputs["position_ids"] == 0).sum())
            counts = {
                "total_tokens": input_ids.numel(),
                "effective_tokens": effective,
                "loss_tokens": int((inputs["labels"][:, 1:] != -100).sum()),
                "sequences": sequences,
            }
            loss = super().training_step(model, inputs, num_items_in_batch)
            RecordingSFTTrainer.pending = {**counts, "loss": float(loss)}
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            rec.begin_step()

        def on_step_end(self, args_, state, control, **kwargs):
            rec.step(**RecordingSFTTrainer.pending)
            if rec.done():
                control.should_training_stop = True

    with tempfile.TemporaryDirectory(prefix="sft-bench-trl-") as out_dir:
        config = SFTConfig(
            output_dir=out_dir,
            per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=1,
            max_length=args.max_length,
            # Upper bound only: the StepTimer callback stops at the effective-token budget.
            max_steps=math.ceil(args.effective_tokens / args.batch_size) + 1,
            learning_rate=args.lr,
            adam_beta1=BETAS[0],
            adam_beta2=BETAS[1],
            adam_epsilon=ADAM_EPS,
            weight_decay=WEIGHT_DECAY,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=GRAD_CLIP_NORM,
            gradient_checkpointing=args.gradient_checkpointing,
            bf16=False,
            fp16=False,
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            eval_strategy="no",
            seed=args.seed,
            **TRL_SIDES[side],
        )
        trainer = RecordingSFTTrainer(
            model=model, args=config, train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()],
        )
        prepared = trainer.train_dataset
        rec.start()
        trainer.train()
        rec.stop()
    optim = trainer.optimizer
    return rec.result(
        side=side,
        trl_version=trl.__version__,
        torch_threads=torch.get_num_threads(),
        prepared_rows=len(prepared),
        optimizer=f"{type(optim).__name__} (fused={optim.defaults.get('fused')}, "
                  f"foreach={optim.defaults.get('foreach')}), param groups "
                  f"{[(len(g['params']), g['weight_decay']) for g in optim.param_groups]}",
        padding_free=trainer.padding_free,
        attn_implementation=trainer.model.config._attn_implementation,
        completion_only_loss=trainer.completion_only_loss,
        gradient_checkpointing=config.gradient_checkpointing,
    )


# ---------------------------------------------------------------------------------------------
# Parent: run the sides, compare, report
# ---------------------------------------------------------------------------------------------


def _child_args(args: argparse.Namespace, side: str, result: Path) -> list[str]:
    out = [sys.executable, str(Path(__file__).resolve()), "--side", side, "--result", str(result),
           "--examples", str(args.examples), "--effective-tokens", str(args.effective_tokens),
           "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--lr", str(args.lr),
           "--threads", str(args.threads), "--vocab-size", str(args.vocab_size), "--seed", str(args.seed)]
    if args.gradient_checkpointing:
        out.append("--gradient-checkpointing")
    return out


def run_side(args: argparse.Namespace, side: str, work: Path) -> dict[str, Any]:
    """Run one side in a child process; rerun (up to --retries times) when other processes used
    more than BUSY_CORES while it trained."""
    for attempt in range(args.retries + 1):
        wait_idle(args.max_wait_idle, BUSY_CORES)
        out = _run_side_once(args, side, work)
        if "error" in out or out["other_processes_cores"] <= BUSY_CORES:
            break
        if attempt < args.retries:
            print(f"[{side}] other processes used {out['other_processes_cores']:.2f} cores while it trained; "
                  "rerunning", flush=True)
    out["attempts"] = attempt + 1
    return out


def _run_side_once(args: argparse.Namespace, side: str, work: Path) -> dict[str, Any]:
    result = work / f"{side}.json"
    log = work / f"{side}.log"
    result.unlink(missing_ok=True)
    rc, wall = run_child(side, _child_args(args, side, result), log, args.threads, args.timeout)
    if rc == 0 and result.exists():
        out = json.loads(result.read_text())
        out["child_wall_s"] = wall
        print(f"[{side}] done in {wall:.0f} s: {out['effective_tokens_per_s']:.0f} effective tok/s, "
              f"peak RSS {out['peak_rss_mib']:.0f} MiB, other processes {out['other_processes_cores']:.2f} cores",
              flush=True)
        return out
    tail = log.read_text(errors="replace").strip().splitlines()[-15:]
    error = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
    print(f"[{side}] FAILED (exit {rc}) after {wall:.0f} s: {error}\n    " + "\n    ".join(tail), flush=True)
    return {"side": side, "error": error or f"exit {rc}", "log_tail": tail}


def _loss_near(trajectory: list[dict], tokens: float, window: float) -> float | None:
    losses = [s["loss"] for s in trajectory if tokens - window < s["cum_effective_tokens"] <= tokens]
    if not losses:  # a step bigger than the window: take the step that crosses the checkpoint
        crossing = [s for s in trajectory if s["cum_effective_tokens"] >= tokens]
        return crossing[0]["loss"] if crossing else None
    return sum(losses) / len(losses)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


FLASH_ATTENTION = ("flash_attention_2", "flash_attention_3")


def not_representative(result: dict[str, Any]) -> str | None:
    """Why a side's timing does not stand for its TRL configuration, from what the side recorded
    (None when it does). TRL documents padding-free batching, which `packing_strategy="bfd"`
    forces on, as supported only with FlashAttention 2 or 3 (TRL 1.16, `SFTConfig.padding_free`:
    "Currently, this is only supported with the FlashAttention 2 or 3 ... When packing is enabled
    with strategy "bfd", padding-free is enabled, regardless of the value of this parameter";
    docs/source/reducing_memory_usage.md, "Padding-free": "highly recommended to use padding-free
    batching with Flash Attention 2"). With any other attention, transformers turns the flattened
    row's position ids into a dense block-diagonal mask over all batch x max_length tokens, so
    attention costs the square of the whole batch instead of the sum of squares per example."""
    if result.get("padding_free") and result.get("attn_implementation") not in FLASH_ATTENTION:
        return (f"padding-free (TRL: only supported with FlashAttention 2 or 3) ran with "
                f"{result.get('attn_implementation')} attention, a dense mask over the whole flattened batch")
    return None


def compare(results: dict[str, dict]) -> dict[str, Any]:
    """Ours over every TRL side that ran and is representative; losses at common checkpoints
    for every side that ran."""
    ok = {side: r for side, r in results.items() if "error" not in r}
    ratios = {}
    if "ours" in ok:
        o = ok["ours"]
        for side, r in ok.items():
            if side == "ours" or not_representative(r):
                continue
            ratios[side] = {
                "effective_tokens_per_s": o["effective_tokens_per_s"] / r["effective_tokens_per_s"],
                "total_tokens_per_s": o["total_tokens_per_s"] / r["total_tokens_per_s"],
                "loss_tokens_per_s": o["loss_tokens_per_s"] / r["loss_tokens_per_s"],
                "effective_tokens_per_cpu_s": o["effective_tokens_per_cpu_s"] / r["effective_tokens_per_cpu_s"],
                "clean_effective_tokens_per_s": _ratio(o["clean_effective_tokens_per_s"],
                                                       r["clean_effective_tokens_per_s"]),
                "peak_rss": o["peak_rss_mib"] / r["peak_rss_mib"],
                "peak_rss_train": o["peak_rss_train_mib"] / r["peak_rss_train_mib"],
            }
    checkpoints = []
    if ok:
        reach = min(r["tokens_effective"] for r in ok.values())
        window = CHECKPOINT_WINDOW * reach
        for fraction in CHECKPOINT_FRACTIONS:
            tokens = fraction * reach
            checkpoints.append({"effective_tokens": round(tokens),
                                "loss": {side: _loss_near(r["trajectory"], tokens, window) for side, r in ok.items()}})
    excluded = {side: reason for side, r in ok.items() if (reason := not_representative(r))}
    return {"ratios_ours_over": ratios, "not_representative": excluded, "loss_checkpoints": checkpoints,
            "steps": {side: r["steps"] for side, r in ok.items()}}


def _fmt(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def render(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# SFT throughput: crucible trainer vs TRL SFTTrainer",
        "",
        f"`{report['command']}`",
        "",
        f"{written_by('benchmarks/sft_throughput.py', report['code'])}.",
        "",
        f"{report['machine']}. Tiny Llama ({report['model_parameters']:,} parameters), fp32, SDPA; tokenizer "
        f"vocab {s['vocab_size']:,}; first {s['examples']:,} GSM8K train problems as chat prompt/completion; "
        f"batch {s['batch_size']} rows, max_length {s['max_length']}, AdamW lr {s['lr']} betas {list(BETAS)} wd "
        f"{WEIGHT_DECAY} constant, clip {GRAD_CLIP_NORM}; gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}; {s['threads']} threads; every side trains until "
        f"{s['effective_tokens']:,} effective (non-padding) tokens.",
        "",
        "| side | steps | train s | effective tok | total tok | padding | loss tok | effective tok/s | total tok/s "
        "| loss tok/s | clean eff tok/s (steps) | eff tok/CPU-s | peak RSS MiB (train) | final loss | other load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:120]} |" + " |" * 13)
            continue
        label = f"{side} (not representative)" if not_representative(r) else side
        lines.append(
            f"| {label} | {r['steps']} | {_fmt(r['train_s'], 1)} | {_fmt(r['tokens_effective'])} | "
            f"{_fmt(r['tokens_total'])} | {r['padding_fraction']:.1%} | {_fmt(r['tokens_loss'])} | "
            f"{_fmt(r['effective_tokens_per_s'])} | {_fmt(r['total_tokens_per_s'])} | {_fmt(r['loss_tokens_per_s'])} | "
            f"{_fmt(r['clean_effective_tokens_per_s'])} ({r['clean_steps']}) | "
            f"{_fmt(r['effective_tokens_per_cpu_s'])} | "
            f"{_fmt(r['peak_rss_mib'])} ({_fmt(r['peak_rss_train_mib'])}) | {_fmt(r['final_loss'], 3)} | "
            f"{r['other_processes_cores']:.2f} |")
    busy = [side for side, r in report["results"].items() if r.get("other_processes_cores", 0) > BUSY_CORES]
    if busy:
        lines += ["", f"**Warning: other processes used more than {BUSY_CORES} cores on average while "
                  f"{', '.join(busy)} trained ('other load'); those timings are not trustworthy. Rerun on an idle "
                  "machine.**"]
    lines += ["", "## Ratios ours / TRL", ""]
    ratios = report["comparison"]["ratios_ours_over"]
    if ratios:
        lines += ["| vs | effective tok/s | total tok/s | loss tok/s | clean eff tok/s | eff tok/CPU-s | peak RSS "
                  "| peak RSS in training |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {side} | {q['effective_tokens_per_s']:.2f}x | {q['total_tokens_per_s']:.2f}x | "
                  f"{q['loss_tokens_per_s']:.2f}x | {_fmt(q['clean_effective_tokens_per_s'], 2, 'x')} | "
                  f"{q['effective_tokens_per_cpu_s']:.2f}x | {q['peak_rss']:.2f}x | {q['peak_rss_train']:.2f}x |"
                  for side, q in ratios.items()]
    else:
        lines.append("n/a (our side or every TRL side did not produce a representative result).")
    excluded = report["comparison"].get("not_representative", {})
    if excluded:
        lines += ["", "Not representative, so not in the ratios: " + "; ".join(
            f"{side}: {reason}" for side, reason in excluded.items()) + "."]
    checkpoints = report["comparison"]["loss_checkpoints"]
    if checkpoints:
        sides = list(checkpoints[0]["loss"])
        lines += ["", "## Loss at common effective-token checkpoints", "",
                  f"Mean of the step losses in the {CHECKPOINT_WINDOW:.0%} of the shortest run's tokens before the "
                  "checkpoint (completion tokens only; per-token mean as each trainer reports it).", "",
                  "| effective tokens | " + " | ".join(sides) + " |", "|---:|" + "---:|" * len(sides)]
        lines += [f"| {c['effective_tokens']:,} | " + " | ".join(_fmt(c["loss"][side], 3) for side in sides) + " |"
                  for c in checkpoints]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"] + measured_notes(report)]
    for side, r in report["results"].items():
        for note in r.get("notes", []):
            lines.append(f"- {side}: {note}")
    return "\n".join(lines)


NOTES = [
    "Train time is the training loop only (TRL: trainer.train(), which includes building the dataloader and "
    "optimizer, collating batches and the per-step logging); tokenization, packing and model construction are "
    "excluded on both sides. 'clean eff tok/s' uses only the per-step times (on_step_begin -> on_step_end: "
    "forward, backward, clipping, update; not the batch collation) of steps after the first 3 during which other "
    f"processes used at most {BUSY_CORES} cores, with how many such steps in parentheses: the number to trust on a "
    "shared machine.",
    "'other load' = CPU time used by other processes during the side's training, in cores (system busy "
    "time minus the child's own CPU time, over the training wall time); 'eff tok/CPU-s' = effective tokens per "
    "CPU-second of the child. With --threads equal to the core count, another busy process slows the run far more "
    "than its share (OpenMP threads wait for a descheduled peer, often spinning, so CPU-seconds inflate too): only "
    "rows with other load near 0 are comparable.",
    "Peak RSS is the child process's lifetime ru_maxrss (it includes dataset preparation); the value in "
    "parentheses is the peak sampled every 10 ms while training.",
    "Per step, TRL 1.16 (read from its source) computes the loss with its fused LM head "
    "(trl.trainer.utils.add_fused_lm_head, outputs log_probs + entropy + is_top1): on CPU (no Triton) it scores "
    "every position, not only completion tokens, in [4096 tokens x vocab] tiles, folds each tile into "
    "online-logsumexp stats plus the entropy and the argmax test with torch ops, and recomputes the projection in "
    "the backward. It then logs entropy and mean_token_accuracy (.item() each step) and a running token count; "
    "Trainer adds floating_point_ops and grad-norm clipping.",
    "trl-wrapped cuts examples across rows and lets tokens attend across example boundaries (attention mask all "
    "ones); trl-bfd keeps examples whole and separate but, without FlashAttention, attends over the flattened "
    "batch_size*max_length row with a dense block-diagonal mask, so its attention cost is quadratic in the "
    "whole batch's tokens (FlashAttention's varlen kernel skips the off-diagonal blocks).",
    "Equal effective tokens is not equal optimizer steps: a side with fewer tokens per step (padding, no packing) "
    "takes more, smaller steps for the same tokens, and at a constant learning rate its loss is lower at the same "
    "checkpoint. Compare losses between sides with the same tokens per step (ours, packed, vs the packed TRL "
    "sides); the data order differs between sides (TRL samples rows at random).",
    "TRL's completion mask covers the tokens after the generation prompt, i.e. the answer, <|im_end|> and the "
    "template's trailing newline; our template's {% generation %} span stops at <|im_end|>.",
]


def measured_notes(report: dict[str, Any]) -> list[str]:
    """Notes whose figures come from this run's results."""
    steps = report["comparison"].get("steps", {})
    if "ours" not in steps:
        return []
    return ["Optimizer steps to the token budget: " + ", ".join(
        f"{side} {count} ({count / steps['ours']:.2f}x ours)" for side, count in steps.items()) + "."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2000, help="First N GSM8K train problems.")
    parser.add_argument("--effective-tokens", type=int, default=100_000,
                        help="Every side trains until it has processed this many non-padding tokens.")
    parser.add_argument("--batch-size", type=int, default=8, help="Rows per optimizer step.")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--gradient-checkpointing", action="store_true", help="On both sides (TRL's own default).")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"Comma-separated subset of {','.join(SIDES)}.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds per side.")
    parser.add_argument("--retries", type=int, default=1,
                        help="Rerun a side this many times when other processes took CPU while it trained.")
    parser.add_argument("--max-wait-idle", type=float, default=60,
                        help="Seconds to wait for an idle machine before each side (then run anyway, flagged).")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # child
        result = run_ours(args) if args.side == "ours" else run_trl(args, args.side)
        args.result.write_text(json.dumps(result))
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown sides {unknown}; choose from {SIDES}")
    started = time.perf_counter()
    ensure_tokenizer(args.vocab_size)
    tokenizer = load_tokenizer(args.vocab_size)
    model = build_model(tokenizer, args.seed)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    work = Path(tempfile.mkdtemp(prefix="crucible-sft-bench-"))
    try:
        results = {side: run_side(args, side, work) for side in sides}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/sft_throughput.py", *sys.argv[1:]]),
        "code": code_version().model_dump(),
        "machine": f"{os.cpu_count()} CPUs visible, Python {sys.version.split()[0]}, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, trl {trl_version}",
        "settings": {k: v for k, v in vars(args).items() if k not in ("side", "result")},
        "model_parameters": parameters,
        "results": results,
        "comparison": compare(results),
        "notes": NOTES,
        "total_s": round(time.perf_counter() - started, 1),
    }
    (HERE / "sft_throughput.json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render(report)
    (HERE / "sft_throughput.md").write_text(markdown + "\n")
    print(markdown)


if __name__ == "__main__":
    main()
