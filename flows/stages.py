"""The pipeline as data: each stage names its component, its params section and its inputs.

The CLI, the Prefect flows and `dvc.yaml` are three drivers over this one table.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from components.artifacts import ComponentSpec, Manifest
from components.config import StrictConfig
from components.data import curate, pack, tokenizer
from components.eval import perplexity, report
from components.feasibility import training as feasibility
from components.feasibility.estimate import REPORT_FILE as ESTIMATE_REPORT
from components.train import pretrain
from flows.params import PipelineParams

RAW_PREFIX = "data."


def training_estimate_config(params: PipelineParams) -> feasibility.TrainingEstimateConfig:
    """The run the pretrain stage will make, on the devices of the `estimate` section."""
    return feasibility.TrainingEstimateConfig(
        target=params.estimate, model=params.pretrain.model, seq_len_tokens=params.pack.seq_len_tokens,
        batch_size_blocks=params.pretrain.train.batch_size_rows, max_steps=params.pretrain.train.max_steps,
    )


@dataclass(frozen=True)
class Stage:
    name: str
    section: str  # key of its config in params.yaml
    spec: ComponentSpec
    entry: Callable[..., Manifest]
    inputs: Mapping[str, str]  # entry keyword -> upstream stage name, or "data.<field>" for raw files
    help: str
    build_config: Callable[[PipelineParams], StrictConfig] | None = None  # when not just params[section]
    markdown_file: str | None = None  # a report in its artifact that flows publish as a Prefect artifact
    sharded: bool = False  # flows fan its shards out as tasks (components.data.curate)
    tables_file: str | None = None  # JSON {name: rows} in its artifact, published as Prefect tables

    def config(self, params: PipelineParams) -> StrictConfig:
        return self.build_config(params) if self.build_config else getattr(params, self.section)

    def dest(self, params: PipelineParams) -> str:
        return f"{params.artifacts_root.rstrip('/')}/{self.name}"

    def input_uris(self, params: PipelineParams) -> dict[str, str]:
        """Default input locations: raw files from `data`, upstream artifacts under the root."""
        uris = {}
        for keyword, source in self.inputs.items():
            if source.startswith(RAW_PREFIX):
                uris[keyword] = getattr(params.data, source.removeprefix(RAW_PREFIX))
            else:
                uris[keyword] = f"{params.artifacts_root.rstrip('/')}/{source}"
        return uris


STAGES: tuple[Stage, ...] = (
    Stage("curate", "curate", curate.SPEC, curate.curate,
          {"input": "data.raw_train", "decontaminate_against": "data.raw_heldout"},
          "Filter, redact PII, decontaminate against the held-out set, exact- and fuzzy-dedup the training records.",
          sharded=True, tables_file=curate.TABLES_FILE),
    Stage("curate_heldout", "curate_heldout", curate.SPEC, curate.curate, {"input": "data.raw_heldout"},
          "Normalise the held-out records (evaluation data: no filtering).", sharded=True),
    Stage("tokenizer", "tokenizer", tokenizer.SPEC, tokenizer.train_tokenizer, {"dataset": "curate"},
          "Train a byte-level BPE tokenizer with a chat template."),
    Stage("pack", "pack", pack.SPEC, pack.pack, {"dataset": "curate", "tokenizer": "tokenizer"},
          "Tokenize and pack documents into fixed-length blocks."),
    Stage("estimate", "estimate", feasibility.SPEC, feasibility.estimate_training, {"tokenizer": "tokenizer"},
          "Estimate FLOPs, memory, time and cost of the pretraining run; the gate pretrain checks.",
          build_config=training_estimate_config, markdown_file=ESTIMATE_REPORT),
    Stage("pretrain", "pretrain", pretrain.SPEC, pretrain.pretrain,
          {"blocks": "pack", "tokenizer": "tokenizer", "estimate": "estimate"},
          "Pretrain a Llama-architecture causal LM from a config (refused if the estimate says it does not fit)."),
    Stage("evaluate", "evaluate", perplexity.SPEC, perplexity.evaluate_perplexity,
          {"model": "pretrain", "dataset": "curate_heldout", "blocks": "pack"},
          "Held-out perplexity with uniform and unigram baselines."),
    Stage("report", "report", report.SPEC, report.report, {"evaluation": "evaluate", "model": "pretrain"},
          "Markdown report, metrics.json and the loss curve.", markdown_file=report.REPORT_FILE),
)
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}

# Every component a flow task can run, by component name. A sharded stage runs as its
# shard component on each shard, then its own component (the merge) on the shards.
COMPONENT_ENTRIES: dict[str, tuple[ComponentSpec, Callable[..., Manifest]]] = {
    **{stage.spec.name: (stage.spec, stage.entry) for stage in STAGES if not stage.sharded},
    curate.SPEC.name: (curate.SPEC, curate.merge_shards),
    curate.SHARD_SPEC.name: (curate.SHARD_SPEC, curate.curate_shard),
}


def run_stage(
    stage: Stage,
    params: PipelineParams,
    input_overrides: Mapping[str, str] | None = None,
    dest: str | None = None,
    overwrite: bool = False,
) -> Manifest:
    """Run one stage directly (the CLI's and DVC's path): inputs default to the pipeline layout."""
    inputs = {**stage.input_uris(params), **(input_overrides or {})}
    return stage.entry(stage.config(params), dest=dest or stage.dest(params), overwrite=overwrite, **inputs)
