"""GRPO step time: crucible's GRPO trainer vs TRL 1.16's `GRPOTrainer`, same model, same prompts, same settings.

    .venv/bin/python benchmarks/grpo_step.py [--steps 20] [--warmup 2] [--threads 2] [--lr 2e-5]
        [--problems 1000] [--init-from DIR] [--sides ours,trl] [--retries 1] [--max-wait-idle 60]

Everything is local (no hub). Model: a freshly initialised tiny Llama (hidden 256, 6 layers, 4 heads,
SwiGLU 688, 512 positions, tied embeddings, SDPA, fp32; ~5.3M parameters with the 2,048-token
tokenizer) built by `components.models.factory.build_causal_lm` after `torch.manual_seed(--seed)`,
with the demo's trained tokenizer (artifacts/tokenizer; if absent, a 2,048-token byte-level BPE is
trained with `components.data.tokenizer` on the arithmetic problems and cached in benchmarks/.cache/).
Model and tokenizer are saved once to a temporary directory that both sides load
(`components.models.factory.load_causal_lm`, fp32, SDPA). --init-from DIR starts from a trained model
instead (e.g. artifacts/sft, whose completions end at <|im_end|> after varying lengths; a fresh model
almost never samples the stop token, so nearly every completion runs the full 64 tokens).

Prompts: the procedural arithmetic task (`components.tasks.arithmetic`, seed --seed, the first
--problems train problems), GSM8K format. Ours reads them as a GSM8K jsonl and renders each question
with the tokenizer's chat template (`components.models.chat.prompt_ids`); TRL gets the conversational
prompt [{"role": "user", "content": question}] plus an `answer` column and applies the same template
(the child checks that the prompt token ids agree).

Equal settings: G = 4 completions per prompt, 4 prompts (16 completions) per optimizer step, one
optimizer step per batch of rollouts, max 64 completion tokens, temperature 1.0 (no top-k / top-p),
generation stops at the same ids (`components.models.chat.stop_ids`: <|endoftext|> and <|im_end|>),
reward = answer correctness (`components.train.rewards.correctness`), group-std advantages, clipped
surrogate eps_low 0.2 / eps_high 0.28 aggregated per token over the batch (TRL loss_type "dapo" = our
token_mean), no KL (beta 0 / kl_coef 0: no reference model), no dynamic sampling on our side, AdamW
(betas 0.9/0.95, eps 1e-8, no weight decay, the fused kernel on both sides) at a constant --lr with no
warmup, grad-norm clipping 1.0, fp32, no gradient checkpointing, torch.set_num_threads(--threads) and
OMP/MKL_NUM_THREADS in both children, no eval, no checkpoints, no external logging, no vLLM.

Measured per side (each in its own subprocess re-invoking this script with --side), over --steps
optimizer steps after --warmup untimed ones:
  ours  the step records of `components.train.grpo.train_job` (run the way the `grpo` component runs
        it, through `launch.run_job` in this process, minus the artifact bookkeeping): step_time_s,
        rollout_time_s (sampling + rewards + advantages), update_time_s (log-probs, loss, backward,
        clipping, AdamW), response_length; pure generation time by timing `components.models.sampling.decode`.
  trl   seconds per optimizer step from a TrainerCallback (on_step_begin -> on_step_end: generation,
        scoring, loss, backward, clipping, AdamW); rollout = `_generate_and_score_completions` (prompt
        templating, `model.generate`, decoding, rewards, advantages), update = step - rollout; pure
        generation by timing the model's `generate`; completion tokens from the completion mask.
Generated tokens count each completion's sampled tokens up to and including its stop token (the
tokens the loss sees), so "gen tok/s" normalises for the different lengths sampling gives each side.

Busy machines: as in sft_throughput.py, each side records the CPU time other processes took during
its timed steps ("other load", in cores); the parent waits up to --max-wait-idle seconds for an idle
machine before each side and reruns a side (up to --retries times) whose other load exceeded 0.1
cores. Writes grpo_step.{json,md} next to this script (or --out PREFIX).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache"
DEMO_TOKENIZER = ROOT / "artifacts" / "tokenizer"

SIDES = ("ours", "trl")
GROUP_SIZE = 4  # G: completions per prompt
PROMPTS_PER_STEP = 4
MAX_NEW_TOKENS = 64
TEMPERATURE = 1.0
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
WEIGHT_DECAY = 0.0
GRAD_CLIP_NORM = 1.0
EPS_LOW, EPS_HIGH = 0.2, 0.28  # our GRPOConfig defaults (DAPO clip-higher)
MODEL = {"hidden_size": 256, "num_layers": 6, "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 688,
         "max_position_embeddings": 512, "tie_word_embeddings": True}
BUSY_CORES = 0.1  # 'other load' above this many cores flags a contaminated timing

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._load import process_cpu_s, run_child, system_busy_s, wait_idle  # noqa: E402
from benchmarks._provenance import written_by  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Shared setup (parent): tokenizer, model, prompts -> a work directory both sides read
# ---------------------------------------------------------------------------------------------


def arithmetic_rows(args: argparse.Namespace) -> list[dict[str, str]]:
    from components.tasks.arithmetic import ArithmeticTaskConfig, generate

    return generate(ArithmeticTaskConfig(train_problems=args.problems, test_problems=10, seed=args.seed))["train"]


def tokenizer_source(args: argparse.Namespace) -> Path:
    """The demo's trained tokenizer if present, else one trained here on the arithmetic problems (cached)."""
    if (DEMO_TOKENIZER / "tokenizer.json").exists():
        return DEMO_TOKENIZER
    out = CACHE / "tokenizer-arithmetic-v2048"
    if (out / "tokenizer.json").exists():
        return out
    from components.tasks.arithmetic import ArithmeticTaskConfig, generate
    from components.records import write_shards
    from components.data.tokenizer import TokenizerConfig, _build

    rows = generate(ArithmeticTaskConfig(train_problems=4000, seed=0))["train"]
    texts = [f"Question: {row['question']}\nAnswer: {row['answer']}" for row in rows]
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tok-", dir=CACHE))
    try:
        write_shards(work / "dataset", {"text": texts}, rows_per_shard=len(texts))
        staging = work / "tokenizer"
        staging.mkdir()
        _build(TokenizerConfig(vocab_size=2048), work / "dataset", staging)
        if not out.exists():  # else a concurrent run got there first
            staging.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def prepare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Save the model + tokenizer to work/model and the prompts to work/problems.jsonl."""
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import ModelConfig, build_causal_lm, load_causal_lm

    model_dir = work / "model"
    if args.init_from:
        source = Path(args.init_from)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        model = load_causal_lm(source, dtype=torch.float32)
        origin = f"loaded from {source}"
    else:
        source = tokenizer_source(args)
        tokenizer = AutoTokenizer.from_pretrained(str(source))
        torch.manual_seed(args.seed)
        model = build_causal_lm(ModelConfig(**MODEL), tokenizer).float()
        origin = f"fresh init (seed {args.seed}), {MODEL}"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    rows = arithmetic_rows(args)
    with open(work / "problems.jsonl", "w", encoding="utf-8") as sink:
        sink.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    from components.models.chat import prompt_ids, stop_ids

    lengths = [len(prompt_ids(tokenizer, row["question"])) for row in rows]
    return {
        "model": origin,
        "model_parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": str(source),
        "vocab_size": len(tokenizer),
        "stop_ids": {str(i): tokenizer.convert_ids_to_tokens(i) for i in stop_ids(tokenizer)},
        "problems": len(rows),
        "prompt_tokens_mean": sum(lengths) / len(lengths),
        "prompt_tokens_max": max(lengths),
    }


def load_problems(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Measurement, shared by both sides
# ---------------------------------------------------------------------------------------------


class Clock:
    """Snapshots (wall, system busy, own CPU) at step boundaries: other processes' load between two."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, float, float]] = []

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), system_busy_s(), process_cpu_s()))

    @staticmethod
    def other_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        seconds = b[0] - a[0]
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2])) / seconds if seconds > 0 else 0.0


def summarize(side: str, steps: list[dict[str, Any]], warmup: int, window_other_cores: float,
              **extra: Any) -> dict[str, Any]:
    """Means over the timed steps (after the warm-up)."""
    timed = steps[warmup:]
    if not timed:
        raise RuntimeError(f"{side}: no timed steps ({len(steps)} steps, warm-up {warmup})")

    def mean(key: str) -> float:
        return sum(s[key] for s in timed) / len(timed)

    tokens = sum(s["completion_tokens"] for s in timed)
    completions = sum(s["completions"] for s in timed)
    generation_s = sum(s["generation_s"] for s in timed)
    clean = [s for s in timed if s["other_cores"] <= BUSY_CORES]
    return {
        "side": side,
        "steps_total": len(steps),
        "steps_timed": len(timed),
        "step_s_mean": mean("seconds"),
        "step_s_median": statistics.median(s["seconds"] for s in timed),
        "step_s_min": min(s["seconds"] for s in timed),
        "rollout_s_mean": mean("rollout_s"),
        "update_s_mean": mean("update_s"),
        "generation_s_mean": mean("generation_s"),
        "rollout_share": sum(s["rollout_s"] for s in timed) / sum(s["seconds"] for s in timed),
        "completions_per_step": completions / len(timed),
        "completion_tokens_mean": tokens / completions,
        "completion_tokens_per_step": tokens / len(timed),
        "generated_tokens_per_s": tokens / generation_s if generation_s else None,
        "step_s_per_1k_completion_tokens": 1000 * sum(s["seconds"] for s in timed) / tokens,
        "finished_fraction": sum(s["finished"] for s in timed) / completions,
        "reward_mean": sum(s["reward_mean"] for s in timed) / len(timed),
        "other_processes_cores": window_other_cores,
        "clean_steps": len(clean),
        "clean_step_s_mean": sum(s["seconds"] for s in clean) / len(clean) if clean else None,
        "trajectory": steps,
        **extra,
    }


# ---------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """`components.train.grpo.train_job`, run as the `grpo` component runs it (launch.run_job, in
    this process), on a fresh run directory; per-step numbers from its metrics.jsonl."""
    import torch

    torch.set_num_threads(args.threads)
    import components.models.sampling as sampling
    from components.runlog import STEP_LOG_FILE, read_metrics
    from components.train.config import TrainConfig
    from components.train.grpo import GRPOConfig
    from components.train.launch import make_job, run_job
    from components.train.optim import OptimConfig
    from components.runlog import step_observer
    from components.train.rewards import RewardSpec
    from components.train.rl import HeldoutSettings

    generation_s: list[float] = []
    decode = sampling.decode

    def timed_decode(*a: Any, **k: Any) -> Any:  # GRPOStep looks sampling.decode up at every rollout
        started = time.perf_counter()
        out = decode(*a, **k)
        generation_s.append(time.perf_counter() - started)
        return out

    sampling.decode = timed_decode
    clock = Clock()
    step_observer.set(lambda _trainer, _record, _max_steps: clock.mark())  # after each step's record is logged

    config = GRPOConfig(
        train=TrainConfig(
            max_steps=args.warmup + args.steps, batch_size_rows=PROMPTS_PER_STEP, micro_batch_rows=None,
            precision="fp32", gradient_checkpointing=False, checkpoint_every_steps=0, seed=args.seed,
            optim=OptimConfig(learning_rate=args.lr, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1],
                              warmup_steps=0, lr_schedule="constant", grad_clip_norm=GRAD_CLIP_NORM),
        ),
        group_size=GROUP_SIZE, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
        rewards=[RewardSpec(function="correctness")], advantage_normalization="group_std",
        loss_aggregation="token_mean", eps_low=EPS_LOW, eps_high=EPS_HIGH, iterations=1, kl_coef=0.0,
        dynamic_sampling=False, problems_format="gsm8k", max_problems=args.problems,
        heldout=HeldoutSettings(problems=0),
    )
    work = Path(args.work)
    with tempfile.TemporaryDirectory(prefix="grpo-bench-ours-") as tmp:
        out_dir, run_dir = Path(tmp) / "out", Path(tmp) / "run"
        out_dir.mkdir()
        job = make_job("grpo", config, {"model": work / "model", "problems": work / "problems.jsonl"}, out_dir,
                       str(out_dir))
        job["run_dir"] = str(run_dir)  # not next to a destination: a fresh run, nothing to resume
        run_job(job, config.train.distributed, 1)
        records = read_metrics(run_dir / STEP_LOG_FILE)
    sampling.decode = decode

    if len(records) != config.train.max_steps or len(generation_s) != len(records):
        raise RuntimeError(f"ours: {len(records)} step records, {len(generation_s)} decode calls, expected "
                           f"{config.train.max_steps} of each (dynamic sampling off: one rollout round per step)")
    rows = GROUP_SIZE * PROMPTS_PER_STEP
    steps = []
    for i, record in enumerate(records):
        if record["groups_trained"] != PROMPTS_PER_STEP or record["sampling_rounds"] != 1:
            raise RuntimeError(f"ours: step {record['step']} trained {record['groups_trained']} groups in "
                               f"{record['sampling_rounds']} rounds")
        steps.append({
            "step": record["step"], "seconds": record["step_time_s"], "rollout_s": record["rollout_time_s"],
            "update_s": record["update_time_s"], "generation_s": generation_s[i],
            "completions": rows, "completion_tokens": round(record["response_length"] * rows),
            "finished": round(record["finished_fraction"] * rows), "reward_mean": record["reward_mean"],
            "other_cores": Clock.other_cores(clock.marks[i - 1], clock.marks[i]) if i else 0.0,
        })
    window = Clock.other_cores(clock.marks[args.warmup - 1], clock.marks[-1]) if args.warmup else \
        sum(s["other_cores"] for s in steps) / len(steps)
    return summarize("ours", steps, args.warmup, window, torch_threads=torch.get_num_threads(), notes=[
        "step_time_s / rollout_time_s / update_time_s from the run's metrics.jsonl (components/train/rl.py "
        "run_rl); generation = components.models.sampling.decode (prefill once per prompt, the KV cache repeated "
        "for the group, finished rows dropped from the batch and the cache)",
        "optimizer: torch.optim.AdamW(fused=True) via components.train.optim.make_optimizer",
    ])


# ---------------------------------------------------------------------------------------------
# TRL side
# ---------------------------------------------------------------------------------------------


def trl_config_fields(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """Every GRPOConfig field this benchmark sets, to make TRL's settings equal to ours."""
    return {
        "output_dir": output_dir,
        # 4 prompts x G=4 = 16 completions per optimizer step, generated and trained in one batch
        "per_device_train_batch_size": GROUP_SIZE * PROMPTS_PER_STEP,
        "num_generations": GROUP_SIZE,
        "gradient_accumulation_steps": 1,  # -> steps_per_generation 1, generation_batch_size 16
        "num_iterations": 1,  # one update per batch of rollouts (our iterations=1)
        "max_steps": args.warmup + args.steps,
        "max_completion_length": MAX_NEW_TOKENS,
        "temperature": TEMPERATURE,
        "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,  # plain multinomial sampling
        "use_vllm": False, "use_transformers_continuous_batching": False,  # model.generate with a KV cache
        "beta": 0.0,  # no KL term, no reference model (our kl_coef=0)
        "loss_type": "dapo",  # per-token mean over the whole batch = our loss_aggregation token_mean
        "epsilon": EPS_LOW, "epsilon_high": EPS_HIGH,  # our eps_low / eps_high (TRL's default high = low)
        "scale_rewards": "group",  # our advantage_normalization group_std
        "mask_truncated_completions": False,  # ours keeps cut-off completions in the loss
        "importance_sampling_level": "token",
        "learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "adam_beta1": BETAS[0], "adam_beta2": BETAS[1], "adam_epsilon": ADAM_EPS, "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": GRAD_CLIP_NORM,
        "bf16": False, "fp16": False,  # TRL defaults bf16=True; ours runs fp32 on CPU
        "gradient_checkpointing": False,  # TRL defaults True; ours has it off
        "use_cpu": True,
        "report_to": "none", "save_strategy": "no", "eval_strategy": "no",
        "seed": args.seed,
    }


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from components.models.chat import prompt_ids, stop_ids
    from components.models.factory import load_causal_lm
    from components.train.rewards import correctness

    work = Path(args.work)
    tokenizer = AutoTokenizer.from_pretrained(str(work / "model"))
    model = load_causal_lm(work / "model", attn_implementation="sdpa", dtype=torch.float32)
    stops = stop_ids(tokenizer)
    # GRPOTrainer stops on the tokenizer's eos plus every id in model.generation_config.eos_token_id, and uses
    # that same list to cut the completion mask: give it our stop ids (<|endoftext|>, <|im_end|>).
    model.generation_config.eos_token_id = stops
    rows = load_problems(work / "problems.jsonl")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                                 for r in rows])

    def correctness_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [correctness(text, reference) for text, reference in zip(texts, answer)]

    steps: list[dict[str, Any]] = []
    pending: dict[str, Any] = {"generation_s": 0.0}
    clock = Clock()

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            pending.update(started=time.perf_counter(), generation_s=0.0)

        def on_step_end(self, args_, state, control, **kwargs):
            seconds = time.perf_counter() - pending["started"]
            clock.mark()
            steps.append({
                "step": state.global_step, "seconds": seconds, "rollout_s": pending["rollout_s"],
                "update_s": seconds - pending["rollout_s"], "generation_s": pending["generation_s"],
                "completions": pending["completions"], "completion_tokens": pending["completion_tokens"],
                "finished": pending["finished"], "reward_mean": pending["reward_mean"],
                "other_cores": Clock.other_cores(clock.marks[-2], clock.marks[-1]) if len(clock.marks) > 1 else 0.0,
            })

    with tempfile.TemporaryDirectory(prefix="grpo-bench-trl-") as out_dir:
        fields = trl_config_fields(args, out_dir)
        config = GRPOConfig(**fields)
        trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward], args=config, train_dataset=dataset,
                              processing_class=tokenizer, callbacks=[StepTimer()])
        if sorted(trainer.eos_token_ids) != stops:
            raise RuntimeError(f"trl: stops on {trainer.eos_token_ids}, ours on {stops}")
        sample = [row["prompt"] for row in dataset.select(range(8))]
        if [list(ids) for ids in trainer._tokenize_prompts(sample)[0]] != [prompt_ids(tokenizer, p) for p in sample]:
            raise RuntimeError("trl: the chat-templated prompt ids differ from components.models.chat.prompt_ids")

        generate = trainer.model.generate  # what _generate_single_turn calls (unwrapped = the model on CPU)

        def timed_generate(*a: Any, **k: Any) -> Any:
            started = time.perf_counter()
            out = generate(*a, **k)
            pending["generation_s"] += time.perf_counter() - started
            return out

        trainer.model.generate = timed_generate
        score = trainer._generate_and_score_completions

        def timed_score(inputs: Any) -> Any:
            started = time.perf_counter()
            out = score(inputs)
            pending["rollout_s"] = time.perf_counter() - started
            lengths = out["completion_mask"].sum(1)
            last = out["completion_ids"].gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
            pending.update(completions=int(lengths.numel()), completion_tokens=int(lengths.sum()),
                           finished=int(torch.isin(last, torch.tensor(stops)).logical_and(lengths > 0).sum()),
                           reward_mean=trainer._metrics["train"]["reward"][-1])
            return out

        trainer._generate_and_score_completions = timed_score
        clock.mark()
        trainer.train()
        generation_config = trainer.generation_config.to_diff_dict()
    if len(steps) != args.warmup + args.steps:
        raise RuntimeError(f"trl: {len(steps)} steps recorded, expected {args.warmup + args.steps}")
    if any(s["completions"] != GROUP_SIZE * PROMPTS_PER_STEP for s in steps):
        raise RuntimeError(f"trl: completions per step {[s['completions'] for s in steps]}")
    window = Clock.other_cores(clock.marks[args.warmup], clock.marks[-1])
    optim = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside accelerate's wrapper
    fields.pop("output_dir")
    return summarize(
        "trl", steps, args.warmup, window, trl_version=trl.__version__, torch_threads=torch.get_num_threads(),
        trl_config=fields, eos_token_ids=trainer.eos_token_ids,
        generation_config={k: v for k, v in generation_config.items() if k != "transformers_version"},
        optimizer=f"{type(optim).__name__} (fused={optim.defaults.get('fused')}), lr scheduler "
                  f"{type(trainer.lr_scheduler).__name__}",
        notes=["steps timed on_step_begin -> on_step_end (TRL's periodic logging, after on_step_end, is "
               "outside); rollout = _generate_and_score_completions, generation = model.generate (transformers' "
               "sampling loop: finished rows keep decoding pad tokens until every row is done)"],
    )


# ---------------------------------------------------------------------------------------------
# Parent: prepare, run the sides, compare, report
# ---------------------------------------------------------------------------------------------


def _child_args(args: argparse.Namespace, side: str, result: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--side", side, "--result", str(result), "--work",
            str(args.work), "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
            "--lr", str(args.lr), "--problems", str(args.problems), "--seed", str(args.seed)]


def run_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    for attempt in range(args.retries + 1):
        if args.max_wait_idle > 0:
            wait_idle(args.max_wait_idle, BUSY_CORES)
        out = _run_side_once(args, side)
        if "error" in out or out["other_processes_cores"] <= BUSY_CORES:
            break
        if attempt < args.retries:
            print(f"[{side}] other processes used {out['other_processes_cores']:.2f} cores during the timed steps; "
                  "rerunning", flush=True)
    out["attempts"] = attempt + 1
    return out


def _run_side_once(args: argparse.Namespace, side: str) -> dict[str, Any]:
    work = Path(args.work)
    result, log = work / f"{side}.json", work / f"{side}.log"
    result.unlink(missing_ok=True)
    rc, wall = run_child(side, _child_args(args, side, result), log, args.threads, args.timeout)
    if rc == 0 and result.exists():
        out = json.loads(result.read_text())
        out["child_wall_s"] = wall
        print(f"[{side}] done in {wall:.0f} s: {out['step_s_mean']:.3f} s/step, {out['completion_tokens_mean']:.1f} "
              f"tokens/completion, other processes {out['other_processes_cores']:.2f} cores", flush=True)
        return out
    tail = log.read_text(errors="replace").strip().splitlines()[-20:]
    error = next((line for line in reversed(tail) if "Error" in line or "error" in line), tail[-1] if tail else "")
    print(f"[{side}] FAILED (exit {rc}) after {wall:.0f} s: {error}\n    " + "\n    ".join(tail), flush=True)
    return {"side": side, "error": error or f"exit {rc}", "log_tail": tail}


RATIO_KEYS = {  # label -> key; TRL / ours
    "s/step (mean)": "step_s_mean",
    "s/step (median)": "step_s_median",
    "rollout s/step": "rollout_s_mean",
    "update s/step": "update_s_mean",
    "generation s/step": "generation_s_mean",
    "gen tok/s": "generated_tokens_per_s",
    "s/step per 1k completion tokens": "step_s_per_1k_completion_tokens",
}


def compare(results: dict[str, dict]) -> dict[str, float | None]:
    ours, trl = results.get("ours", {}), results.get("trl", {})
    if "error" in ours or "error" in trl or not ours or not trl:
        return {}
    out = {}
    for label, key in RATIO_KEYS.items():
        a, b = trl.get(key), ours.get(key)
        out[label] = a / b if a is not None and b not in (None, 0) else None
    return out


def _fmt(value: Any, digits: int = 3, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def render(report: dict) -> str:
    s, setup = report["settings"], report["setup"]
    lines = [
        "# GRPO step time: crucible `grpo` vs TRL `GRPOTrainer`",
        "",
        f"`{report['command']}`",
        "",
        f"{written_by('benchmarks/grpo_step.py', report['code'])}.",
        "",
        f"{report['machine']}. Tiny Llama ({setup['model_parameters']:,} parameters; {setup['model']}), fp32, SDPA; "
        f"tokenizer {setup['tokenizer']} (vocab {setup['vocab_size']:,}); {setup['problems']} arithmetic-task prompts "
        f"(chat template, {setup['prompt_tokens_mean']:.0f} tokens on average, max {setup['prompt_tokens_max']}); "
        f"{PROMPTS_PER_STEP} prompts x G={GROUP_SIZE} = {PROMPTS_PER_STEP * GROUP_SIZE} completions per optimizer step, "
        f"max {MAX_NEW_TOKENS} new tokens, temperature {TEMPERATURE}, stop ids {setup['stop_ids']}; reward = "
        f"correctness; one update per rollout batch, no KL, AdamW lr {s['lr']} constant; {s['threads']} threads. "
        f"Means over {s['steps']} steps after {s['warmup']} warm-up steps.",
        "",
        "| side | s/step mean | s/step median | rollout s/step | update s/step | generation s/step | rollout share "
        "| mean completion tokens | finished | gen tok/s | reward | other load | clean steps (mean s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for side, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:120]} |" + " |" * 11)
            continue
        lines.append(
            f"| {side} | {_fmt(r['step_s_mean'])} | {_fmt(r['step_s_median'])} | {_fmt(r['rollout_s_mean'])} | "
            f"{_fmt(r['update_s_mean'])} | {_fmt(r['generation_s_mean'])} | {r['rollout_share']:.0%} | "
            f"{_fmt(r['completion_tokens_mean'], 1)} | {r['finished_fraction']:.0%} | "
            f"{_fmt(r['generated_tokens_per_s'], 0)} | {_fmt(r['reward_mean'], 3)} | "
            f"{r['other_processes_cores']:.2f} | {r['clean_steps']} ({_fmt(r['clean_step_s_mean'])}) |")
    busy = [side for side, r in report["results"].items() if r.get("other_processes_cores", 0) > BUSY_CORES]
    if busy:
        lines += ["", f"**Warning: other processes used more than {BUSY_CORES} cores on average during the timed "
                  f"steps of {', '.join(busy)} ('other load'); those timings are not trustworthy. Rerun on an idle "
                  "machine.**"]
    lines += ["", "## Ratios TRL / ours", ""]
    ratios = report["comparison"]
    if ratios:
        lines += ["| " + " | ".join(ratios) + " |", "|" + "---:|" * len(ratios),
                  "| " + " | ".join(_fmt(v, 2, "x") for v in ratios.values()) + " |",
                  "", "Above 1x: TRL takes longer (for gen tok/s: TRL generates faster)."]
    else:
        lines.append("n/a (a side did not produce a result).")
    trl = report["results"].get("trl", {})
    if "trl_config" in trl:
        lines += ["", "## TRL configuration", "",
                  "GRPOConfig fields set (everything else is TRL's default): "
                  + ", ".join(f"`{k}={v!r}`" for k, v in trl["trl_config"].items()) + ".",
                  f"Model generation_config.eos_token_id set to {trl['eos_token_ids']} (the trainer's stop and "
                  f"completion-mask ids). Effective generation config: `{trl['generation_config']}`. "
                  f"Optimizer: {trl['optimizer']}."]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    for side, r in report["results"].items():
        for note in r.get("notes", []):
            lines.append(f"- {side}: {note}")
    return "\n".join(lines)


NOTES = [
    "s/step is the whole optimizer step: rollout (sampling, decoding to text, rewards, advantages) and update "
    "(log-probs of the 16 completions with grad, clipped surrogate, backward, grad clipping, AdamW). rollout share "
    "= rollout / step. update = the rest of the step (TRL: step - rollout, so it also holds Trainer's per-step "
    "bookkeeping).",
    "Completion lengths differ by sampling: 'mean completion tokens' counts each completion's tokens up to and "
    "including its stop token, 'finished' is the fraction that ended with a stop token (not cut at the limit). "
    "'gen tok/s' = those tokens / generation time, and 's/step per 1k completion tokens' normalises the step time "
    "by them. A freshly initialised model almost never samples a stop token, so both sides then generate ~64 "
    "tokens per completion; with --init-from a trained model lengths vary, and a sampler that drops finished rows "
    "gains over one that keeps decoding them.",
    "Neither side computes a separate 'old policy' forward (one update per rollout batch: the log-probs of the "
    "update's forward, detached, are the old ones) nor a reference forward (no KL).",
    "'other load' = CPU time used by other processes during the timed steps, in cores; with --threads equal to the "
    "core count, only rows with other load near 0 are comparable. 'clean steps' = timed steps with other load "
    f"<= {BUSY_CORES} cores, and their mean s/step.",
    "TRL scores the completion tokens with its fused LM head (trl.trainer.utils.add_fused_lm_head, log-probs + "
    "entropy in tiles, the projection recomputed in backward); ours projects the completion positions to the "
    "vocabulary once (components.models.logprobs.completion_logprobs). Advantages: TRL divides by (std + 1e-4), ours by "
    "(std + 1e-6); the data order differs (each side's own seeded sampler).",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="Timed optimizer steps per side.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps before them.")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--problems", type=int, default=1000, help="Arithmetic train problems to draw prompts from.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--init-from", help="A trained model directory (with its tokenizer) instead of a fresh model.")
    parser.add_argument("--sides", default=",".join(SIDES), help=f"Comma-separated subset of {','.join(SIDES)}.")
    parser.add_argument("--timeout", type=float, default=1800, help="Seconds per side.")
    parser.add_argument("--retries", type=int, default=1,
                        help="Rerun a side this many times when other processes took CPU during its timed steps.")
    parser.add_argument("--max-wait-idle", type=float, default=60,
                        help="Seconds to wait for an idle machine before each side (0: don't wait).")
    parser.add_argument("--out", type=Path, default=HERE / "grpo_step", help="Writes OUT.json and OUT.md.")
    parser.add_argument("--side", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    if args.side:  # child
        result = run_ours(args) if args.side == "ours" else run_trl(args)
        args.result.write_text(json.dumps(result))
        return

    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = sorted(set(sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown sides {unknown}; choose from {SIDES}")
    started = time.perf_counter()
    args.work = Path(tempfile.mkdtemp(prefix="crucible-grpo-bench-"))
    try:
        setup = prepare(args, args.work)
        results = {side: run_side(args, side) for side in sides}
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    import torch
    from components.artifacts import code_version
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:
        trl_version = None
    report = {
        "command": " ".join([".venv/bin/python", "benchmarks/grpo_step.py", *sys.argv[1:]]),
        "machine": f"{os.cpu_count()} CPUs visible, Python {sys.version.split()[0]}, torch {torch.__version__}, "
                   f"transformers {transformers.__version__}, trl {trl_version}",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                     if k not in ("side", "result", "work")},
        "setup": setup,
        "results": results,
        "comparison": compare(results),
        "notes": NOTES,
        "total_s": round(time.perf_counter() - started, 1),
        "code": code_version().model_dump(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    markdown = render(report)
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(markdown)
    failed = [side for side, r in results.items() if "error" in r]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
