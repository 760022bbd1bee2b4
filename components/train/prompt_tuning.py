"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"): the model stays frozen and only k virtual-token embeddings, prepended to every
input, are trained.

Initialisations (the paper's §2.2 and §3.2):
- `text`: the embeddings of a human-written prompt, tokenized and truncated or repeated to k
  tokens (the "class label / sampled vocab" family; text is what the seed post studies);
- `vocab`: embeddings of k tokens sampled from the vocabulary (special tokens excluded);
- `random`: uniform in [-0.5, 0.5], the paper's random initialisation.

`prompt_tuning_study` runs every initialisation with several seeds on the same data and
budget and reports held-out loss, mean and spread: the seed post's text-vs-random experiment.
It reports how many train and held-out examples were used of how many the files hold (never
the `max_*_examples` cap in their place), and names a better initialisation only when the
seeds support it: at least `MIN_SEEDS` seeds each, and a gap in mean held-out loss larger than
`SPREAD_FACTOR` combined seed standard deviations; otherwise it says "no verdict" and why.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from components.artifacts import ArtifactRef, ComponentSpec, Manifest, produce, read_manifest
from components.config import StrictConfig
from components.records import count_records
from components.data.sft_data import SFTFormat, pad_examples, tokenized_examples
from components.runlog import PUBLISHED_STEP_LOG_FILE, read_metrics
from components.train.batches import TrainData
from components.train.config import TrainConfig
from components.train.launch import Job, Prepared, Trained, TrainerJob, produce_trained
from components.train.optim import OptimConfig
from components.feasibility.model_flops import training_flops_per_token
from components.train.publish import ModelSaver, summarize

if TYPE_CHECKING:
    import torch

SPEC = ComponentSpec(name="prompt_tuning", version="2")  # 2: example counts in the metrics
STUDY_SPEC = ComponentSpec(name="prompt_tuning_study", version="2")  # 2: counts used, verdict only with seed support
PROMPT_FILE = "soft_prompt.safetensors"
STUDY_REPORT = "report.md"
STUDY_PLOT = "heldout_loss.png"
STUDY_METRICS = "metrics.json"

Init = Literal["text", "vocab", "random"]
RANDOM_INIT_RANGE = 0.5  # Lester et al. 2021 §3.2: uniform in [-0.5, 0.5]
MIN_SEEDS = 2  # one run per initialisation has no seed spread to weigh a difference against
SPREAD_FACTOR = 2.0  # a winner's gap must exceed this many combined seed standard deviations


class PromptTuningConfig(StrictConfig):
    num_virtual_tokens: int = Field(8, gt=0)
    init: Init = "text"
    init_text: str = Field("Solve the math word problem step by step, then write #### and the final answer.",
                           min_length=1)
    format: SFTFormat = "gsm8k"
    seq_len_tokens: int = Field(320, ge=2, description="Longest example (prompt excluded); longer ones are cut.")
    max_train_examples: int = Field(512, gt=0)
    max_heldout_examples: int = Field(128, gt=0)
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=60, batch_size_rows=16, checkpoint_every_steps=0,
        optim=OptimConfig(learning_rate=0.03, weight_decay=0.0, warmup_steps=5, grad_clip_norm=1.0)))


def initial_prompt(init: Init, k: int, embeddings: torch.Tensor, tokenizer: Any, text: str, seed: int) -> torch.Tensor:
    """The [k, d_model] starting value of the soft prompt."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if init == "text":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = (ids * math.ceil(k / len(ids)))[:k]  # truncate, or repeat a short prompt
        return embeddings[torch.tensor(ids)].clone()
    if init == "vocab":
        special = set(tokenizer.all_special_ids)
        candidates = torch.tensor([i for i in range(embeddings.shape[0]) if i not in special])
        return embeddings[candidates[torch.randperm(len(candidates), generator=generator)[:k]]].clone()
    return (torch.rand(k, embeddings.shape[1], generator=generator) * 2 - 1) * RANDOM_INIT_RANGE


def heldout_loss(module: Any, rows: dict[str, torch.Tensor], batch_rows: int = 16) -> float:
    """Mean next-token loss per assistant token on held-out examples, with the soft prompt."""
    import torch

    device = module.soft_prompt.device
    module.eval()
    total = tokens = 0.0
    with torch.no_grad():
        for start in range(0, len(rows["input_ids"]), batch_rows):
            batch = {name: tensor[start:start + batch_rows].to(device) for name, tensor in rows.items()}
            total += float(module(**batch))
            tokens += int((batch["labels"][:, 1:] != -100).sum())
    module.train()
    return total / tokens


def _rows(path: Path, config: PromptTuningConfig, tokenizer: Any, limit: int) -> dict[str, torch.Tensor]:
    import torch

    examples = tokenized_examples(path, config.format, tokenizer, max_examples=limit)
    padded = pad_examples(examples, config.seq_len_tokens, tokenizer.pad_token_id, True, str(path))
    return {name: torch.tensor(padded[name], dtype=torch.long) for name in ("input_ids", "labels")}


def fit(job: Job) -> Trained:
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm
    from components.train.engine import train
    from components.train.modules import SoftPromptLoss

    config, paths = job.config, job.paths
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = load_causal_lm(paths["model"], dtype=torch.float32)
    train_rows = _rows(paths["dataset"], config, tokenizer, config.max_train_examples)
    heldout_rows = _rows(paths["heldout"], config, tokenizer, config.max_heldout_examples)
    embeddings = model.get_input_embeddings().weight.detach()
    start = initial_prompt(config.init, config.num_virtual_tokens, embeddings, tokenizer, config.init_text,
                           config.train.seed)
    module = SoftPromptLoss(model, start)
    trainable_params = module.soft_prompt.numel()  # before ZeRO-3 could partition it
    no_prompt = SoftPromptLoss(model, torch.zeros(0, embeddings.shape[1]))
    loss_without_prompt = heldout_loss(no_prompt, heldout_rows)
    loss_at_init = heldout_loss(module, heldout_rows)
    width = int(train_rows["input_ids"].shape[1]) + config.num_virtual_tokens
    result = train(module, TrainData(train_rows, pad_token_id=tokenizer.pad_token_id, source=str(paths["dataset"])),
                   config.train, job.run_dir, save_model=ModelSaver(model=None, soft_prompt_file=PROMPT_FILE),
                   final_dir=job.out_dir, flops_per_token=training_flops_per_token(model, width),
                   description="prompt_tuning")

    def report() -> dict[str, Any]:
        return {
            "init": config.init, "seed": config.train.seed, "num_virtual_tokens": config.num_virtual_tokens,
            "trainable_params": trainable_params,
            "train_examples": int(train_rows["input_ids"].shape[0]),
            "train_examples_available": count_records(paths["dataset"]),
            "heldout_examples": int(heldout_rows["input_ids"].shape[0]),
            "heldout_examples_available": count_records(paths["heldout"]),
            "heldout_loss_without_prompt": loss_without_prompt,
            "heldout_loss_at_init": loss_at_init,
            "heldout_loss": heldout_loss(module, heldout_rows),
            **summarize(result, job.run_dir),
        }

    return Trained(result.rank, report)


train_job = TrainerJob(PromptTuningConfig, fit)


def prompt_tuning(config: PromptTuningConfig, model: str, dataset: str, heldout: str, dest: str,
                  overwrite: bool = False) -> Manifest:
    """Train a soft prompt for the frozen `model` on `dataset`, scored on `heldout` records."""
    def write_config(out_dir: Path, paths: dict[str, Path]) -> Prepared:
        (out_dir / "prompt_tuning.json").write_text(config.model_dump_json(indent=2), encoding="utf-8")
        return Prepared()

    return produce_trained(SPEC, config, {"model": model, "dataset": dataset, "heldout": heldout}, dest,
                           f"Prompt tuning ({config.init} init, seed {config.train.seed})", overwrite=overwrite,
                           prepare=write_config)


# --------------------------------------------------------------------------- the study


class PromptTuningStudyConfig(StrictConfig):
    base: PromptTuningConfig = PromptTuningConfig()
    inits: list[Init] = Field(["text", "random", "vocab"], min_length=1)
    seeds: list[int] = Field([0, 1, 2], min_length=1)


def trial_name(init: str, seed: int) -> str:
    return f"trial_{init}_seed{seed}"


def plan_trials(config: PromptTuningStudyConfig, dest: str) -> list[tuple[str, PromptTuningConfig, str]]:
    """(name, config, destination) of every trial: each init with each seed, same data and budget."""
    trials = []
    for init in config.inits:
        for seed in config.seeds:
            trial = config.base.model_copy(update={
                "init": init, "train": config.base.train.model_copy(update={"seed": seed})})
            trials.append((trial_name(init, seed), trial, f"{dest.rstrip('/')}.trials/{init}-seed{seed}"))
    return trials


def compare_inits(first: str, second: str, by_init: dict[str, dict[str, Any]]) -> tuple[str | None, str]:
    """The initialisation with the lower mean held-out loss of `first` and `second`, and the
    sentence that says so; or None and "no verdict: ..." when the seeds cannot support one
    (fewer than MIN_SEEDS each, or a gap within SPREAD_FACTOR combined standard deviations,
    sqrt(std_a^2 + std_b^2), the spread of the difference of two runs)."""
    a, b = by_init[first], by_init[second]
    better, worse = (first, second) if a["mean"] <= b["mean"] else (second, first)
    gap = abs(a["mean"] - b["mean"])
    seeds = min(len(a["runs"]), len(b["runs"]))
    if seeds < MIN_SEEDS:
        return None, (f"no verdict: {seeds} seed per initialisation has no seed spread to weigh the "
                      f"{gap:.4f} nats/token gap against (run at least {MIN_SEEDS} seeds each)")
    noise = math.hypot(a["std"], b["std"])
    if gap <= SPREAD_FACTOR * noise:
        return None, (f"no verdict: {better} is lower than {worse} by {gap:.4f} nats/token, within "
                      f"{SPREAD_FACTOR:g} combined seed standard deviations ({noise:.4f})")
    spread = f"{gap / noise:.1f} combined seed standard deviations" if noise else "seeds agree exactly"
    return better, f"{better} initialisation is better than {worse} by {gap:.4f} nats/token ({spread}, {seeds} seeds)"


def used_of_available(trials: dict[str, dict[str, Any]], kind: str, cap: int) -> str:
    """"3 of 3 held-out examples" or "128 of 1319 ... (capped by max_heldout_examples=128)",
    from what the trials actually used (a range if they differ)."""
    used = sorted({t[f"{kind}_examples"] for t in trials.values()})
    available = max(t[f"{kind}_examples_available"] for t in trials.values())
    label = "held-out" if kind == "heldout" else kind
    count = str(used[0]) if len(used) == 1 else f"{used[0]}-{used[-1]}"
    capped = f" (capped by max_{kind}_examples={cap})" if available > cap else ""
    return f"{count} of {available} {label} examples{capped}"


def _plot_curves(config: PromptTuningStudyConfig, trials: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for init in config.inits:
        for seed in config.seeds:
            curve = trials[trial_name(init, seed)]["loss_curve"]
            axis.plot(range(1, len(curve) + 1), curve, color={"text": "C0", "random": "C1", "vocab": "C2"}[init],
                      alpha=0.6, label=init if seed == config.seeds[0] else None)
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (nats/token)")
    axis.set_title("Prompt tuning by initialisation")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _summarize_trials(config: PromptTuningStudyConfig, trials: dict[str, dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    rows, by_init = [], {}
    for init in config.inits:
        losses = [trials[trial_name(init, seed)]["heldout_loss"] for seed in config.seeds]
        at_init = [trials[trial_name(init, seed)]["heldout_loss_at_init"] for seed in config.seeds]
        std = statistics.stdev(losses) if len(losses) > 1 else None  # one run has no spread (not a spread of 0)
        by_init[init] = {"mean": statistics.fmean(losses), "std": std, "runs": losses}
        rows.append({"init": init, "seeds": len(losses), "heldout_loss_mean": statistics.fmean(losses),
                     "heldout_loss_std": std, "heldout_loss_at_init_mean": statistics.fmean(at_init)})
    baseline = statistics.fmean(t["heldout_loss_without_prompt"] for t in trials.values())
    ranked = sorted(by_init, key=lambda init: by_init[init]["mean"])
    best, verdict = (compare_inits(ranked[0], ranked[1], by_init) if len(ranked) > 1
                     else (None, "no verdict: only one initialisation was run"))
    base = config.base
    lines = [
        "# Prompt tuning: initialisation study", "",
        f"Frozen model, {base.num_virtual_tokens} virtual tokens, {base.train.max_steps} steps x "
        f"{base.train.batch_size_rows} examples, lr {base.train.optim.learning_rate}, seeds {config.seeds}; "
        f"trained on {used_of_available(trials, 'train', base.max_train_examples)}. "
        f"Held-out loss per assistant token on {used_of_available(trials, 'heldout', base.max_heldout_examples)}; "
        f"without any prompt {baseline:.4f}.", "",
        "| init | seeds | held-out loss (mean ± std) | at initialisation |", "|---|---|---|---|",
    ]
    lines += [f"| {r['init']} | {r['seeds']} | {r['heldout_loss_mean']:.4f} ± "
              f"{'n/a' if r['heldout_loss_std'] is None else format(r['heldout_loss_std'], '.4f')} | "
              f"{r['heldout_loss_at_init_mean']:.4f} |" for r in rows]
    lines += ["", f"Best initialisation: {verdict}."]
    if "text" in by_init and "random" in by_init and len(ranked) > 2:
        lines += ["", f"Text vs random: {compare_inits('text', 'random', by_init)[1]}."]
    lines += ["", f"Text prompt: `{base.init_text}`", ""]
    (out_dir / STUDY_REPORT).write_text("\n".join(lines), encoding="utf-8")
    _plot_curves(config, trials, out_dir / STUDY_PLOT)
    first = next(iter(trials.values()))
    metrics = {"best_init": best, "verdict": verdict, "heldout_loss_without_prompt": baseline,
               "train_examples": first["train_examples"], "heldout_examples": first["heldout_examples"],
               **{f"heldout_loss_{init}_mean": v["mean"] for init, v in by_init.items()},
               **{f"heldout_loss_{init}_std": v["std"] for init, v in by_init.items()}}
    (out_dir / STUDY_METRICS).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    return {**metrics, "table": rows}


def summarize_study(config: PromptTuningStudyConfig, dest: str, overwrite: bool = False,
                    **trials: str | ArtifactRef) -> Manifest:
    """Aggregate the published trials (`trial_<init>_seed<k>=URI`) into the study artifact."""
    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        results = {}
        for name in trials:
            metrics = dict(read_manifest(str(paths[name])).metrics)
            records = read_metrics(paths[name] / PUBLISHED_STEP_LOG_FILE)
            results[name] = {**metrics, "loss_curve": [r["loss"] for r in records]}
        return _summarize_trials(config, results, out_dir)

    return produce(STUDY_SPEC, config, dict(trials), dest, build, overwrite=overwrite)


def prompt_tuning_study(config: PromptTuningStudyConfig, model: str, dataset: str, heldout: str, dest: str,
                        overwrite: bool = False, map_trials: Any = map) -> Manifest:
    """Run every (init, seed) trial (published next to `dest` as `DEST.trials/`), then the report."""
    def run(trial: tuple[str, PromptTuningConfig, str]) -> Manifest:
        return prompt_tuning(trial[1], model, dataset, heldout, trial[2], overwrite=overwrite)

    plan = plan_trials(config, dest)
    manifests = list(map_trials(run, plan))
    return summarize_study(config, dest, overwrite=overwrite,
                           **{name: manifest.output for (name, _, _), manifest in zip(plan, manifests)})
