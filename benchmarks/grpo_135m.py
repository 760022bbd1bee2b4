"""One GRPO step on SmolLM2-135M-Instruct: crucible's GRPO trainer vs TRL 1.16's `GRPOTrainer`.

    .venv/bin/python benchmarks/grpo_135m.py [--model DIR] [--precision bf16|fp32] [--steps 3] [--warmup 1]
        [--prompts 4] [--group-size 4] [--max-new-tokens 128] [--threads 2] [--out PREFIX]

Model: SmolLM2-135M-Instruct, imported from the installed GGUF as in sft_135m.py (benchmarks/.cache/,
once) or --model DIR; both sides load it with `components.models.factory.load_causal_lm` (fp32
weights, SDPA). Prompts: the arithmetic task (`components.tasks.arithmetic`, max_steps=1: one
operation, seed --seed, the first --problems train problems), rendered with the model's own chat
template (TRL gets conversational prompts; the child checks the prompt ids agree with
`components.models.chat.prompt_ids`).

Equal settings: --prompts prompts x G = --group-size completions per optimizer step, one update per
rollout batch, up to --max-new-tokens new tokens (each completion stops at the model's stop ids
`components.models.chat.stop_ids`, so its real length counts), temperature 1.0, no top-k / top-p,
reward = answer correctness (`components.train.rewards.correctness`), group-std advantages, clipped
surrogate eps 0.2 / 0.28 aggregated per token (TRL loss_type "dapo" = our token_mean), no KL (no
reference model), no dynamic sampling, AdamW betas (0.9, 0.95), eps 1e-8, no weight decay, the fused
kernel, constant lr, clipping 1.0, gradient checkpointing off, --threads threads. Precision: bf16 =
autocast with fp32 master weights on both sides (ours TrainConfig.precision "bf16", rollouts at the
train precision; TRL bf16=True, accelerate's autocast); the TRL child records the dtype its model's
layers compute in during generation and during the update (a forward hook), so the report shows what
TRL actually ran.

Measured per side (its own subprocess): --warmup untimed optimizer steps, then --steps timed ones;
seconds per step (ours: the step record's step_time_s; TRL: a callback on_step_begin -> on_step_end),
rollout seconds (ours rollout_time_s; TRL `_generate_and_score_completions`), completion tokens.
Report: median and range of s/step per side, the ratio TRL / ours of the medians (the issue's goal:
>= 2x), and the mean completion length each side sampled. Busy machines: as in grpo_step.py, each
side records other processes' CPU use per timed step. Writes PREFIX.json / PREFIX.md (default
benchmarks/grpo_135m).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SIDES = ("ours", "trl")
TEMPERATURE = 1.0
BETAS, ADAM_EPS, WEIGHT_DECAY, GRAD_CLIP_NORM = (0.9, 0.95), 1e-8, 0.0, 1.0
EPS_LOW, EPS_HIGH = 0.2, 0.28

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks._real_model import (  # noqa: E402
    add_run_args, add_side_args, busy_note, check_steps, chosen_sides, markdown_head, model_dir,
    report_head, run_in_child, run_side, spread, write_report)
from benchmarks.grpo_step import Clock, load_problems  # noqa: E402


def write_problems(args: argparse.Namespace, path: Path) -> None:
    from components.tasks.arithmetic import ArithmeticTaskConfig, generate

    rows = generate(ArithmeticTaskConfig(train_problems=args.problems, test_problems=10, max_steps=1,
                                         seed=args.seed))["train"]
    path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows))


def step_summary(steps: list[dict[str, Any]], warmup: int, **extra: Any) -> dict[str, Any]:
    timed = steps[warmup:]
    seconds = [s["seconds"] for s in timed]
    return {
        "step_s": spread(seconds),
        "rollout_s_median": statistics.median(s["rollout_s"] for s in timed),
        "completion_tokens_mean": sum(s["completion_tokens"] for s in timed) / sum(s["completions"] for s in timed),
        "other_cores_max": max(s["other_cores"] for s in timed),
        "steps": steps,
        **extra,
    }


# --- ours --------------------------------------------------------------------------------------


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    """`components.train.grpo` run as the `grpo` component runs it (launch.run_job, in this process)."""
    from components.runlog import STEP_LOG_FILE, read_metrics, step_observer
    from components.train.config import TrainConfig
    from components.train.grpo import GRPOConfig
    from components.train.launch import make_job, run_job
    from components.train.optim import OptimConfig
    from components.train.rewards import RewardSpec
    from components.train.rl import HeldoutSettings

    clock = Clock()
    step_observer.set(lambda _trainer, _record, _max_steps: clock.mark())
    config = GRPOConfig(
        train=TrainConfig(
            max_steps=args.warmup + args.steps, batch_size_rows=args.prompts, precision=args.precision,
            gradient_checkpointing=False, checkpoint_every_steps=0, seed=args.seed,
            optim=OptimConfig(learning_rate=args.lr, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1],
                              warmup_steps=0, lr_schedule="constant", grad_clip_norm=GRAD_CLIP_NORM)),
        group_size=args.group_size, max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE,
        rewards=[RewardSpec(function="correctness")], advantage_normalization="group_std",
        loss_aggregation="token_mean", eps_low=EPS_LOW, eps_high=EPS_HIGH, iterations=1, kl_coef=0.0,
        dynamic_sampling=False, problems_format="gsm8k", max_problems=args.problems,
        rollout_precision="train",  # sample in the run's precision, as TRL generates under its autocast
        heldout=HeldoutSettings(problems=0))
    with tempfile.TemporaryDirectory(prefix="grpo-135m-ours-") as tmp:
        out_dir, run_dir = Path(tmp) / "out", Path(tmp) / "run"
        out_dir.mkdir()
        clock.mark()
        job = make_job("grpo", config, {"model": args.model, "problems": args.work / "problems.jsonl"}, out_dir,
                       str(out_dir))
        job["run_dir"] = str(run_dir)  # a fresh run, nothing to resume
        run_job(job, config.train.distributed, 1)
        records = read_metrics(run_dir / STEP_LOG_FILE)
    rows = args.prompts * args.group_size
    steps = [{"seconds": r["step_time_s"], "rollout_s": r["rollout_time_s"], "completions": rows,
              "completion_tokens": round(r["response_length"] * rows), "reward_mean": r["reward_mean"],
              "other_cores": Clock.other_cores(clock.marks[i], clock.marks[i + 1])} for i, r in enumerate(records)]
    return step_summary(steps, args.warmup, side="ours", precision=args.precision)


# --- TRL ---------------------------------------------------------------------------------------


def trl_config_fields(args: argparse.Namespace, output_dir: str) -> dict[str, Any]:
    """Every GRPOConfig field this benchmark sets, to make TRL's settings equal to ours."""
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": args.prompts * args.group_size, "num_generations": args.group_size,
        "gradient_accumulation_steps": 1, "num_iterations": 1, "max_steps": args.warmup + args.steps,
        "max_completion_length": args.max_new_tokens, "temperature": TEMPERATURE,
        "top_p": 1.0, "top_k": 0, "min_p": None, "repetition_penalty": 1.0,
        "use_vllm": False, "use_transformers_continuous_batching": False,
        "beta": 0.0, "loss_type": "dapo", "epsilon": EPS_LOW, "epsilon_high": EPS_HIGH, "scale_rewards": "group",
        "mask_truncated_completions": False, "importance_sampling_level": "token",
        "learning_rate": args.lr, "lr_scheduler_type": "constant", "warmup_steps": 0,
        "adam_beta1": BETAS[0], "adam_beta2": BETAS[1], "adam_epsilon": ADAM_EPS, "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": GRAD_CLIP_NORM, "bf16": args.precision == "bf16", "fp16": False,
        "gradient_checkpointing": False, "use_cpu": True, "report_to": "none", "save_strategy": "no",
        "eval_strategy": "no", "seed": args.seed,
    }


def instrument(trainer: Any, pending: dict[str, Any]) -> dict[str, set[str]]:
    """Time TRL's rollout (`_generate_and_score_completions`) into `pending`, and record the dtype
    the first MLP computes in, by phase (generation: inside `model.generate`; update: the rest)."""
    compute_dtypes: dict[str, set[str]] = {"generation": set(), "update": set()}
    phase = {"now": "update"}
    trainer.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda _m, _i, out: compute_dtypes[phase["now"]].add(str(out.dtype)))
    generate, score = trainer.model.generate, trainer._generate_and_score_completions

    def tagged_generate(*a: Any, **k: Any) -> Any:
        phase["now"] = "generation"
        try:
            return generate(*a, **k)
        finally:
            phase["now"] = "update"

    def timed_score(inputs: Any) -> Any:
        started = time.perf_counter()
        out = score(inputs)
        lengths = out["completion_mask"].sum(1)
        pending.update(rollout_s=time.perf_counter() - started, completions=int(lengths.numel()),
                       completion_tokens=int(lengths.sum()))
        return out

    trainer.model.generate, trainer._generate_and_score_completions = tagged_generate, timed_score
    return compute_dtypes


def run_trl(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from components.models.chat import prompt_ids, stop_ids
    from components.models.factory import load_causal_lm
    from components.train.rewards import correctness

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    model = load_causal_lm(args.model, attn_implementation="sdpa", dtype=torch.float32)
    stops = stop_ids(tokenizer)
    model.generation_config.eos_token_id = stops  # TRL stops and cuts the completion mask at these ids
    rows = load_problems(args.work / "problems.jsonl")
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["question"]}], "answer": r["answer"]}
                                 for r in rows])

    def correctness_reward(completions: list, answer: list[str], **_: Any) -> list[float]:
        return [correctness(c[-1]["content"] if isinstance(c, list) else c, a) for c, a in zip(completions, answer)]

    steps: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    clock = Clock()
    class StepTimer(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            pending["started"] = time.perf_counter()
            clock.mark()

        def on_step_end(self, args_, state, control, **kwargs):
            clock.mark()
            steps.append({"seconds": time.perf_counter() - pending["started"], "rollout_s": pending["rollout_s"],
                          "completions": pending["completions"], "completion_tokens": pending["completion_tokens"],
                          "other_cores": Clock.other_cores(clock.marks[-2], clock.marks[-1])})

    with tempfile.TemporaryDirectory(prefix="grpo-135m-trl-") as out_dir:
        fields = trl_config_fields(args, out_dir)
        trainer = GRPOTrainer(model=model, reward_funcs=[correctness_reward], args=GRPOConfig(**fields),
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[StepTimer()])
        if sorted(trainer.eos_token_ids) != stops:
            raise RuntimeError(f"trl: stops on {trainer.eos_token_ids}, ours on {stops}")
        sample = [row["prompt"] for row in dataset.select(range(8))]
        if [list(ids) for ids in trainer._tokenize_prompts(sample)[0]] != [prompt_ids(tokenizer, p) for p in sample]:
            raise RuntimeError("trl: the chat-templated prompt ids differ from components.models.chat.prompt_ids")
        compute_dtypes = instrument(trainer, pending)
        trainer.train()
    fields.pop("output_dir")
    return step_summary(steps, args.warmup, side="trl", trl_version=trl.__version__, trl_config=fields,
                        mixed_precision=str(trainer.accelerator.mixed_precision),
                        weights_dtype=str(next(trainer.model.parameters()).dtype),
                        compute_dtypes={k: sorted(v) for k, v in compute_dtypes.items()})


# --- parent ------------------------------------------------------------------------------------


def run_grpo_side(args: argparse.Namespace, side: str) -> dict[str, Any]:
    out = run_side(Path(__file__).resolve(), args, side, args.work, [
        "--work", str(args.work), "--model", str(args.model), "--precision", args.precision, "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--prompts", str(args.prompts), "--group-size", str(args.group_size),
        "--max-new-tokens", str(args.max_new_tokens), "--problems", str(args.problems), "--lr", str(args.lr),
        "--threads", str(args.threads), "--seed", str(args.seed)])
    if "error" not in out:
        print(f"[{side}] {out['child_wall_s']:.0f} s: {out['step_s']['median']:.2f} s/step (median), "
              f"{out['completion_tokens_mean']:.1f} tokens/completion", flush=True)
    return out


def render(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        *markdown_head(f"GRPO step on SmolLM2-135M-Instruct: crucible vs TRL GRPOTrainer ({s['precision']})",
                       "benchmarks/grpo_135m.py", report),
        f"{report['machine']}. Model {s['model']}; arithmetic prompts (one operation, chat template); {s['prompts']} "
        f"prompts x G={s['group_size']} per step, up to {s['max_new_tokens']} new tokens, temperature {TEMPERATURE}, "
        f"{s['precision']}{' autocast, fp32 master weights' if s['precision'] == 'bf16' else ''}, {s['threads']} "
        f"threads. {s['warmup']} warm-up step(s), then {s['steps']} timed steps: median (min-max).", "",
        "| side | s/step | rollout s/step (median) | mean completion tokens | other load |",
        "|---|---:|---:|---:|---:|",
    ]
    for side, r in report["results"].items():
        if "error" in r:
            lines.append(f"| {side} | failed: {r['error'][:150]} | | | |")
            continue
        q = r["step_s"]
        lines.append(f"| {side} | {q['median']:.2f} ({q['min']:.2f}-{q['max']:.2f}) | {r['rollout_s_median']:.2f} | "
                     f"{r['completion_tokens_mean']:.1f} | {r['other_cores_max']:.2f} |")
    if report.get("trl_over_ours") is not None:
        lines += ["", f"TRL / ours, median s/step: **{report['trl_over_ours']:.2f}x**."]
    trl = report["results"].get("trl", {})
    if "compute_dtypes" in trl:
        lines += ["", f"TRL ran with accelerate mixed_precision={trl['mixed_precision']}, {trl['weights_dtype']} "
                  f"weights; its first MLP computed in {trl['compute_dtypes']} (generation / update)."]
    return "\n".join(lines + busy_note(report["results"]))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_args(parser)
    parser.add_argument("--prompts", type=int, default=4, help="Prompts per optimizer step.")
    parser.add_argument("--group-size", type=int, default=4, help="G: completions per prompt.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--problems", type=int, default=200, help="Arithmetic train problems to draw prompts from.")
    add_side_args(parser, SIDES, HERE / "grpo_135m", lr=1e-6, seed=0)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    return check_steps(parser, parser.parse_args())


def main() -> None:
    args = parse_args()
    if args.side:  # child
        run_in_child(args, run_ours, run_trl)
        return
    sides = chosen_sides(args.sides, SIDES)
    started = time.perf_counter()
    args.model = model_dir(args.model)
    args.work = Path(tempfile.mkdtemp(prefix="crucible-grpo-135m-"))
    try:
        write_problems(args, args.work / "problems.jsonl")
        results = {side: run_grpo_side(args, side) for side in sides}
    finally:
        shutil.rmtree(args.work, ignore_errors=True)
    ok = {side: r for side, r in results.items() if "error" not in r}
    report = {
        **report_head("benchmarks/grpo_135m.py", args, ("side", "result", "work")),
        "results": results,
        "trl_over_ours": ok["trl"]["step_s"]["median"] / ok["ours"]["step_s"]["median"] if len(ok) == 2 else None,
        "total_s": round(time.perf_counter() - started, 1),
    }
    write_report(args.out, report, render(report))
    if len(ok) < len(results):
        sys.exit(f"FAILED: {', '.join(sorted(set(results) - set(ok)))}")


if __name__ == "__main__":
    main()
