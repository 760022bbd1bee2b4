"""Reward model: a scalar head on our causal LM, trained on preference pairs.

The model is `AutoModelForSequenceClassification` with one label, loaded from the (SFT) model
directory: transformers keeps the decoder and adds a fresh linear `score` head (d_model -> 1;
`LlamaForSequenceClassification` for our models). The reward of a (prompt, completion) is
the head's output at the last non-padding token of the chat-templated conversation
(InstructGPT, Ouyang et al. 2022, §3.5: the SFT model with its unembedding layer replaced by
a scalar head); the config's `pad_token_id` is set so transformers can find that token.

The loss is Bradley-Terry's, -log sigmoid(r_chosen - r_rejected - margin) (`losses.
bradley_terry_loss`), one loss unit per pair, through the shared training loop; each step
logs its batch's pairwise accuracy and mean reward margin. A seeded held-out share of the
pairs is scored before and after training (the "after" from the published model, so it
measures what was written). The artifact is a plain transformers model directory
(`save_pretrained` + tokenizer) that `AutoModelForSequenceClassification.from_pretrained`
loads; `components.models.reward` loads it and scores conversations for the evaluators (best-of-n) and PPO.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.errors import ConfigError
from components.feasibility.model_flops import reward_model_flops_per_token
from components.models.reward import load_reward_backbone, load_reward_model
from components.train.config import TrainConfig
from components.train.launch import Job, Trained, TrainerJob, produce_trained
from components.train.optim import OptimConfig
from components.train.publish import ModelSaver, summarize

SPEC = ComponentSpec(name="reward_model", version="1")
INPUT_COLUMNS = ("chosen_input_ids", "rejected_input_ids")  # a reward model reads no labels


class RewardModelConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size_rows=8, optim=OptimConfig(learning_rate=1e-4, warmup_steps=10)))
    max_length_tokens: int = Field(512, ge=2, description="Longest prompt + completion; longer ones are cut at the end.")
    margin: float = Field(0.0, ge=0, description="Constant margin m of -log sigmoid(r_chosen - r_rejected - m).")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the pairs held out (seeded) for accuracy.")
    split_seed: int = 0
    strict_pairs: bool = Field(False, description="Refuse a pair with chosen == rejected instead of skipping it.")
    eval_batch_rows: int = Field(32, gt=0, description="Pairs per forward pass when scoring held-out pairs.")


def fit(job: Job) -> Trained:
    import torch
    from transformers import AutoTokenizer

    from components.data.preferences import pairs_file, read_pairs, tokenize_pairs
    from components.train.engine import train
    from components.train.pairwise import PairwiseRewardLoss, evaluate_pairs, pair_train_data, split_heldout

    config, paths = job.config, job.paths
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    source = str(pairs_file(paths["pairs"]))
    read = read_pairs(paths["pairs"], strict=config.strict_pairs)
    tokenized = tokenize_pairs(tokenizer, read.pairs, config.max_length_tokens, source)
    columns = {name: tokenized.columns[name] for name in INPUT_COLUMNS}
    torch.manual_seed(config.train.seed)  # the new score head is drawn from it: the same head on every rank and rerun
    model = load_reward_backbone(paths["model"], tokenizer)
    width = tokenized.stats["width_tokens"]
    if width > model.config.max_position_embeddings:
        raise ConfigError(f"{source}: conversations of {width} tokens exceed the model's context "
                          f"({model.config.max_position_embeddings}); lower max_length_tokens")
    train_rows, heldout_rows = split_heldout(columns, config.heldout_fraction, config.split_seed, source)
    module = PairwiseRewardLoss(model, config.margin)
    before = evaluate_pairs(module, heldout_rows, config.eval_batch_rows) if heldout_rows else None
    result = train(module, pair_train_data(train_rows, tokenizer.pad_token_id, source), config.train, job.run_dir,
                   save_model=ModelSaver(tokenizer), final_dir=job.out_dir, description="reward_model",
                   flops_per_token=reward_model_flops_per_token(model.config, width))

    def report() -> dict[str, Any]:
        return {**_pair_metrics(config, read, tokenized, train_rows, heldout_rows, model, before, job.out_dir),
                **summarize(result, job.run_dir)}

    return Trained(result.rank, report)


train_job = TrainerJob(RewardModelConfig, fit)


def _pair_metrics(config: RewardModelConfig, read: Any, tokenized: Any, train_rows: dict[str, Any],
                  heldout_rows: dict[str, Any] | None, model: Any, before: dict[str, float] | None,
                  out_dir: Path) -> dict[str, Any]:
    """The pairs read and used, the held-out accuracy, margin and loss before training and of
    the published model, and the epochs trained."""
    from components.train.pairwise import PairwiseRewardLoss, evaluate_pairs

    metrics: dict[str, Any] = {
        "pairs_read": len(read.pairs) + read.identical_skipped, "identical_pairs_skipped": read.identical_skipped,
        **tokenized.stats, "train_pairs": len(train_rows["chosen_input_ids"]),
        "heldout_pairs": 0 if heldout_rows is None else len(heldout_rows["chosen_input_ids"]),
        "params": sum(p.numel() for p in model.parameters()),
    }
    if heldout_rows is not None:
        published = PairwiseRewardLoss(load_reward_model(out_dir)[0], config.margin)
        after = evaluate_pairs(published, heldout_rows, config.eval_batch_rows)
        for name, values in (("before", before), ("after", after)):
            metrics[f"heldout_accuracy_{name}"] = values["pairwise_accuracy"]
            metrics[f"heldout_margin_{name}"] = values["reward_margin"]
            metrics[f"heldout_loss_{name}"] = values["loss"]
    epochs = config.train.max_steps * config.train.batch_size_rows / metrics["train_pairs"]
    return {**metrics, "epochs": round(epochs, 3)}


def reward_model(config: RewardModelConfig, pairs: str, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Train a reward model from `model` (an (SFT) model directory) on `pairs` (a
    `preference_pairs` artifact or a pairs .jsonl file)."""
    return produce_trained(SPEC, config, {"pairs": pairs, "model": model}, dest, "Reward model", overwrite=overwrite)
