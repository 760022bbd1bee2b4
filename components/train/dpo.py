"""Direct preference optimisation (Rafailov et al. 2023, "Direct Preference Optimization: Your
Language Model is Secretly a Reward Model"), in two components:

- `dpo_reference`: the frozen reference model's summed completion log-probs, log ref(y|x), of
  every pair's chosen and rejected side, computed once and published with the tokenized
  pairs and the tokenizer that made them (TRL's `precompute_ref_log_probs`). The reference
  never changes during training, so caching it halves the forward passes of every step and
  frees the memory of a second model; as an artifact it is cached across runs too (same
  pairs, same reference, same config: no work).
- `dpo`: trains the policy (initialised from `model`, usually the same SFT model as the
  reference) on those rows with `losses.dpo_loss` (sigmoid, ipo or hinge; beta; label
  smoothing) through the shared training loop, one loss unit per pair. Every step logs the
  implicit rewards beta (log pi(y|x) - log ref(y|x)) of chosen and rejected, their margin and
  the reward accuracy; a seeded held-out share of the pairs gives the held-out DPO loss and
  implicit-reward accuracy before and after training. Before training the policy is the
  reference, so the sigmoid loss is log 2 and every implicit reward is 0 (exactly so in fp32,
  where the reference is computed; under bf16 autocast the first step is only close to it);
  a tie (h = 0) counts as a wrong ranking in the reward accuracy, as in TRL.

The cached token ids are only meaningful to a policy with the same tokenizer: `dpo` compares
the policy's tokenizer with the one stored in the reference artifact
(`components.models.tokenizers.check_same_tokenizer`: vocabulary, merges, special tokens, chat
template) and refuses a mismatch. The policy must also be the model the reference log-probs
were computed from (the reference's manifest records its content hash): any other policy
starts away from the reference, so the first loss is not log 2 and the KL tie is to a model
that is not being trained. `allow_policy_other_than_reference: true` asks for that explicitly
(e.g. continuing from a DPO checkpoint) and is recorded in the metrics. The published model is
a plain transformers causal LM directory, as `sft` publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from components.artifacts import ArtifactRef, ComponentSpec, Manifest, input_ref, produce, read_manifest
from components.config import StrictConfig
from components.data.preferences import PAIR_COLUMNS, pair_text, pairs_file, read_pairs, tokenize_pairs
from components.errors import ConfigError, DataError
from components.models.tokenizers import FINGERPRINT_KEY, check_same_tokenizer
from components.train.config import TrainConfig
from components.train.launch import Job, Prepared, Trained, TrainerJob, produce_trained
from components.train.optim import OptimConfig
from components.train.losses import DPOVariant
from components.feasibility.model_flops import training_flops_per_token
from components.train.publish import ModelSaver, summarize

if TYPE_CHECKING:
    import torch

    from components.train.pairwise import DPOLoss

REFERENCE_SPEC = ComponentSpec(name="dpo_reference", version="1")
SPEC = ComponentSpec(name="dpo", version="1")
REFERENCE_DATA = Path("data") / "part-00000.parquet"
TOKENIZER_DIR = "tokenizer"
LOGP_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")
TEXT_COLUMNS = ("prompt", "chosen", "rejected")  # the text, or a conversational pair's messages as JSON


class DPOReferenceConfig(StrictConfig):
    max_length_tokens: int = Field(512, ge=2, description="Longest prompt + completion; longer ones are cut at the end.")
    strict_pairs: bool = Field(False, description="Refuse a pair with chosen == rejected instead of skipping it.")
    batch_rows: int = Field(16, gt=0, description="Pairs per forward pass of the reference.")


class DPOConfig(StrictConfig):
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(
        max_steps=100, batch_size_rows=8, optim=OptimConfig(learning_rate=1e-6, warmup_steps=10)))
    beta: float = Field(0.1, gt=0, description="Strength of the KL tie to the reference (DPO's beta).")
    loss_type: DPOVariant = Field("sigmoid", description="sigmoid (DPO), ipo (IPO) or hinge (SLiC).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed label-flip rate (conservative DPO).")
    heldout_fraction: float = Field(0.1, ge=0, lt=1, description="Share of the pairs held out (seeded).")
    split_seed: int = 0
    eval_batch_rows: int = Field(32, gt=0, description="Pairs per forward pass when scoring held-out pairs.")
    allow_policy_other_than_reference: bool = Field(
        False, description="Train a policy that is not the model the reference log-probs were computed from "
                           "(its first loss is then not log 2); refused unless set.")

    @model_validator(mode="after")
    def _smoothing_needs_sigmoid(self) -> "DPOConfig":
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {self.loss_type!r}")
        return self


# --------------------------------------------------------------------------- the reference


def reference_logprobs(model: Any, columns: dict[str, torch.Tensor], batch_rows: int) -> dict[str, torch.Tensor]:
    """log ref(y|x) of every pair's chosen and rejected side (fp32, no gradients)."""
    import torch

    from components.models.logprobs import sequence_logprobs
    from components.train.pairwise import evaluation_device

    device = evaluation_device()
    model.to(device).eval()
    out = {name: [] for name in LOGP_COLUMNS}
    with torch.no_grad():
        for start in range(0, len(columns["chosen_input_ids"]), batch_rows):
            for side in ("chosen", "rejected"):
                ids = columns[f"{side}_input_ids"][start:start + batch_rows].to(device)
                labels = columns[f"{side}_labels"][start:start + batch_rows].to(device)
                out[f"ref_{side}_logps"].append(sequence_logprobs(model, ids, labels).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def _build_reference(config: DPOReferenceConfig, paths: dict[str, Path], out_dir: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm

    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    model = load_causal_lm(paths["model"], dtype=torch.float32)
    source = str(pairs_file(paths["pairs"]))
    read = read_pairs(paths["pairs"], strict=config.strict_pairs)
    tokenized = tokenize_pairs(tokenizer, read.pairs, config.max_length_tokens, source)
    width = tokenized.stats["width_tokens"]
    if width > model.config.max_position_embeddings:
        raise ConfigError(f"{source}: conversations of {width} tokens exceed the reference model's context "
                          f"({model.config.max_position_embeddings}); lower max_length_tokens")
    logps = reference_logprobs(model, tokenized.columns, config.batch_rows)
    kept = [read.pairs[index] for index in tokenized.kept]
    table = {name: pa.array([pair_text(pair, name) for pair in kept], pa.string()) for name in TEXT_COLUMNS}
    table |= {name: pa.array(tokenized.columns[name].tolist(), pa.list_(pa.int32())) for name in PAIR_COLUMNS}
    table |= {name: pa.array(logps[name].double().tolist(), pa.float64()) for name in LOGP_COLUMNS}
    (out_dir / REFERENCE_DATA).parent.mkdir(parents=True)
    pq.write_table(pa.table(table), out_dir / REFERENCE_DATA)
    tokenizer.save_pretrained(out_dir / TOKENIZER_DIR)
    return {"pairs_read": len(read.pairs) + read.identical_skipped, "identical_pairs_skipped": read.identical_skipped,
            **tokenized.stats,
            "mean_ref_chosen_logps": float(logps["ref_chosen_logps"].mean()),
            "mean_ref_rejected_logps": float(logps["ref_rejected_logps"].mean())}


def dpo_reference(config: DPOReferenceConfig, pairs: str, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Tokenize `pairs` (a `preference_pairs` artifact or a pairs .jsonl file) with `model`'s
    tokenizer and cache `model`'s log-probs of every chosen and rejected completion."""
    from components.locks import exclusive  # one heavy model job at a time per process, as training

    def build(out_dir: Path, paths: dict[str, Path]) -> dict[str, Any]:
        with exclusive():
            return _build_reference(config, paths, out_dir)

    return produce(REFERENCE_SPEC, config, {"pairs": pairs, "model": model}, dest, build, overwrite=overwrite)


def load_reference(reference_dir: Path) -> dict[str, torch.Tensor]:
    """The tokenized pairs and cached reference log-probs of a `dpo_reference` artifact, as tensors."""
    import pyarrow.parquet as pq
    import torch

    path = reference_dir / REFERENCE_DATA
    if not path.is_file():
        raise DataError(f"{reference_dir}: no {REFERENCE_DATA} (expected a dpo_reference artifact)")
    table = pq.read_table(path)
    missing = [name for name in (*PAIR_COLUMNS, *LOGP_COLUMNS) if name not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing} (has {table.column_names})")
    columns = {name: torch.tensor(table.column(name).to_pylist(), dtype=torch.long) for name in PAIR_COLUMNS}
    columns |= {name: torch.tensor(table.column(name).to_pylist(), dtype=torch.float64) for name in LOGP_COLUMNS}
    return columns


# --------------------------------------------------------------------------- training


def fit(job: Job) -> Trained:
    import torch
    from transformers import AutoTokenizer

    from components.models.factory import load_causal_lm
    from components.train.engine import train
    from components.train.pairwise import evaluate_pairs, pair_train_data, split_heldout

    config, paths = job.config, job.paths
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    columns = load_reference(paths["reference"])
    source = str(paths["reference"] / REFERENCE_DATA)
    model = load_causal_lm(paths["model"], dtype=torch.float32)
    width = int(columns["chosen_input_ids"].shape[1])
    if width > model.config.max_position_embeddings:
        raise ConfigError(f"{source}: rows of {width} tokens exceed the policy's context "
                          f"({model.config.max_position_embeddings})")
    train_rows, heldout_rows = split_heldout(columns, config.heldout_fraction, config.split_seed, source)
    module = _loss_module(config, model)
    before = evaluate_pairs(module, heldout_rows, config.eval_batch_rows) if heldout_rows else None
    result = train(module, pair_train_data(train_rows, tokenizer.pad_token_id, source), config.train, job.run_dir,
                   save_model=ModelSaver(tokenizer), final_dir=job.out_dir, description="dpo",
                   flops_per_token=training_flops_per_token(model, width))

    def report() -> dict[str, Any]:
        return {**_pair_metrics(config, train_rows, heldout_rows, model, before, job.out_dir),
                **summarize(result, job.run_dir)}

    return Trained(result.rank, report)


train_job = TrainerJob(DPOConfig, fit)


def _loss_module(config: DPOConfig, policy: Any) -> DPOLoss:
    from components.train.pairwise import DPOLoss

    return DPOLoss(policy, config.beta, config.loss_type, config.label_smoothing)


def _pair_metrics(config: DPOConfig, train_rows: dict[str, torch.Tensor], heldout_rows: dict[str, torch.Tensor] | None,
                  model: Any, before: dict[str, float] | None, out_dir: Path) -> dict[str, Any]:
    """The pairs used, the held-out DPO loss and implicit rewards before training and of the
    published policy, and the epochs trained."""
    import torch

    from components.models.factory import load_causal_lm
    from components.train.pairwise import evaluate_pairs

    metrics: dict[str, Any] = {
        "train_pairs": len(train_rows["chosen_input_ids"]),
        "heldout_pairs": 0 if heldout_rows is None else len(heldout_rows["chosen_input_ids"]),
        "params": sum(p.numel() for p in model.parameters()), "beta": config.beta, "loss_type": config.loss_type,
    }
    if heldout_rows is not None:
        published = _loss_module(config, load_causal_lm(out_dir, dtype=torch.float32))
        after = evaluate_pairs(published, heldout_rows, config.eval_batch_rows)
        for name, values in (("before", before), ("after", after)):
            metrics[f"heldout_loss_{name}"] = values["loss"]
            metrics[f"heldout_reward_accuracy_{name}"] = values["reward_accuracy"]
            metrics[f"heldout_chosen_reward_{name}"] = values["chosen_reward"]
            metrics[f"heldout_rejected_reward_{name}"] = values["rejected_reward"]
            metrics[f"heldout_reward_margin_{name}"] = values["reward_margin"]
    epochs = config.train.max_steps * config.train.batch_size_rows / metrics["train_pairs"]
    return {**metrics, "epochs": round(epochs, 3)}


def policy_is_reference_model(config: DPOConfig, reference: str, policy: ArtifactRef) -> bool:
    """Whether `policy` is the model `reference`'s log-probs were computed from (by content
    hash, from the reference's manifest); a different policy is a ConfigError naming both
    unless `config.allow_policy_other_than_reference`."""
    computed_from = read_manifest(reference).inputs.get("model")
    if computed_from is None:
        raise ConfigError(f"reference {reference}: its manifest records no `model` input (not a dpo_reference artifact)")
    same = computed_from.content_hash == policy.content_hash
    if not same and not config.allow_policy_other_than_reference:
        raise ConfigError(
            f"policy {policy.uri} ({policy.content_hash[:19]}) is not the model the reference log-probs of {reference} "
            f"were computed from, {computed_from.uri} ({computed_from.content_hash[:19]}): DPO would start away from "
            "its reference (first loss not log 2). Use that model as the policy, or set "
            "dpo.allow_policy_other_than_reference: true to train this one against that reference"
        )
    return same


def dpo(config: DPOConfig, reference: str, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Train the policy `model` with DPO on the pairs and cached log-probs of `reference`
    (a `dpo_reference` artifact); publish it as a transformers causal LM directory."""
    policy = input_ref(model)  # resolved once: for the identity check and for `produce`
    same_model = policy_is_reference_model(config, reference, policy)

    def check(out_dir: Path, paths: dict[str, Path]) -> Prepared:
        fingerprint = check_same_tokenizer("the tokenizer of reference", paths["reference"] / TOKENIZER_DIR,
                                           "the policy", paths["model"])
        return Prepared({"policy_is_reference_model": same_model, FINGERPRINT_KEY: fingerprint})

    return produce_trained(SPEC, config, {"reference": reference, "model": policy}, dest,
                           f"DPO ({config.loss_type}, beta {config.beta})", overwrite=overwrite, prepare=check)
