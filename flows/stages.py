"""The pipeline as data: each stage names its component, its params section and its inputs.

The CLI, the Prefect flows and `dvc.yaml` are three drivers over this one table: each stage
gets its flow (and its place in the composite flows it names) and its `crucible` command from
its entry here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from components.artifacts import ArtifactRef, ComponentSpec, Manifest, input_origins, stage_rerun
from components.config import StrictConfig
from components.agents import traces as agent_traces
from components.tasks import arithmetic, splits
from components.data import curate, pack, preferences, sft_data, tokenizer
from components.eval import accuracy, answer_loss, chain_report, compare, perplexity, report
from components.eval import agents as agent_eval
from components.models import gguf_export, importer
from components.feasibility import training as feasibility
from components.feasibility.estimate import REPORT_FILE as ESTIMATE_REPORT
from components.train import agent_grpo, dpo, grpo, grpo_study, ppo, prompt_tuning, pretrain, reward_model, sft
from components.train.backends import local_device, resolve_precision
from components.runlog import TRAIN_REPORT_FILE
from flows import estimate_cli, report_cli
from flows.inputs import ResolvedInput, resolve_inputs
from flows.params import DEFAULT_PARAMS_FILE, PipelineParams

RAW_PREFIX = "data."


def training_estimate_config(params: PipelineParams) -> feasibility.TrainingEstimateConfig:
    """The run the pretrain stage will make, on the devices of the `estimate` section; without
    an `estimate.precision` of its own, in the precision pretrain's `train.precision` resolves to
    on this machine (`auto`: bf16 where the device has bf16 units), the one its gate checks."""
    target = params.estimate
    if "precision" not in target.model_fields_set:
        target = target.model_copy(update={"precision": resolve_precision(params.pretrain.train.precision,
                                                                          local_device())})
    return feasibility.TrainingEstimateConfig(
        target=target, model=params.pretrain.model, seq_len_tokens=params.pack.seq_len_tokens,
        batch_size_blocks=params.pretrain.train.batch_size_rows, max_steps=params.pretrain.train.max_steps,
    )


@dataclass(frozen=True)
class FanOut:
    """A stage made of independent parts, then a merge: flows run the parts as parallel tasks.

    `plan(config, inputs, dest)` lists the parts as (merge input name, part config, part dest);
    each part runs component `part` (entry `run_part`) on the stage inputs named in `part_inputs`;
    the merge runs the stage's own component (`merge`, entry `run_merge`) on the inputs in
    `merge_inputs` plus every part.
    """

    part: ComponentSpec
    run_part: Callable[..., Manifest]
    plan: Callable[[StrictConfig, Mapping[str, ArtifactRef], str], list[tuple[str, StrictConfig, str]]]
    part_inputs: tuple[str, ...]
    merge: ComponentSpec
    run_merge: Callable[..., Manifest]
    merge_inputs: tuple[str, ...]


def _curate_parts(config: StrictConfig, inputs: Mapping[str, ArtifactRef], dest: str) -> list[tuple[str, StrictConfig, str]]:
    return [(curate.shard_input_name(index), shard, shard_dest)
            for index, (shard, shard_dest) in enumerate(curate.plan_shards(config, inputs["input"], dest))]


def _prompt_tuning_parts(config: StrictConfig, inputs: Mapping[str, ArtifactRef], dest: str) -> list[tuple[str, StrictConfig, str]]:
    return prompt_tuning.plan_trials(config, dest)


def _grpo_study_parts(config: StrictConfig, inputs: Mapping[str, ArtifactRef], dest: str) -> list[tuple[str, StrictConfig, str]]:
    return grpo_study.plan_seeds(config, dest)


CURATE_FAN_OUT = FanOut(curate.SHARD_SPEC, curate.curate_shard, _curate_parts, ("input", "decontaminate_against"),
                        curate.SPEC, curate.merge_shards, ("input", "decontaminate_against"))
PROMPT_TUNING_FAN_OUT = FanOut(prompt_tuning.SPEC, prompt_tuning.prompt_tuning, _prompt_tuning_parts,
                               ("model", "dataset", "heldout"), prompt_tuning.STUDY_SPEC, prompt_tuning.summarize_study, ())
AGENT_GRPO_STUDY_FAN_OUT = FanOut(agent_grpo.SPEC, agent_grpo.agent_grpo, _grpo_study_parts, ("model",),
                                  agent_grpo.STUDY_SPEC, agent_grpo.summarize_agent_study, ())
GRPO_STUDY_FAN_OUT = FanOut(grpo.SPEC, grpo.grpo, _grpo_study_parts, ("model", "problems", "heldout"),
                            grpo_study.SPEC, grpo_study.summarize_study, ())


@dataclass(frozen=True)
class CliVariant:
    """Another mode of a stage's `crucible` command: `add_arguments` adds its arguments (before the
    stage's own), `defaults` replaces the stage arguments' defaults, and when `selected(args)` it
    runs `run(args)` instead of the stage."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    selected: Callable[[argparse.Namespace], bool]
    run: Callable[[argparse.Namespace], None]
    description: str | None = None  # the command's description, printed as written (else the stage help)
    defaults: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Composite:
    """A flow that runs every stage naming it as `composite`, in table order, each on its upstream's manifests."""

    name: str
    description: str
    report_stage: str | None = None  # its metrics are the flow's metrics table; `crucible run` prints its report
    params_file: str = DEFAULT_PARAMS_FILE  # the params file its flow and command read by default


COMPOSITES = (
    Composite("pipeline", "The whole chain", report_stage="report"),
    Composite("rl_studies", "The RL studies, after `pipeline`"),
    Composite("real", "A real pretrained model end to end (SmolLM2-135M-Instruct by default)", report_stage="real_report",
              params_file="real/params.yaml"),
    Composite("agents", "Agents with tools, memory and reflection, and agentic RL, on the imported model",
              params_file="agents/params.yaml"),
)
COMPOSITES_BY_NAME = {composite.name: composite for composite in COMPOSITES}
ESTIMATE_CLI = CliVariant(estimate_cli.add_arguments, estimate_cli.wants_adhoc, estimate_cli.run_adhoc,
                          description=estimate_cli.__doc__,
                          defaults={"config": None})  # so an explicit --config can be told from the default
REPORT_CLI = CliVariant(report_cli.add_arguments, report_cli.names_artifact, report_cli.print_report)


def default_params_file(flow: str) -> str:
    """The params file a flow or stage command reads when none is named."""
    found = COMPOSITES_BY_NAME.get(flow) or STAGES_BY_NAME.get(flow)
    return found.params_file if found else DEFAULT_PARAMS_FILE


def flow_name(name: str) -> str:
    """Prefect's name for the flow of a stage or composite (and the prefix of its artifact keys)."""
    return name.replace("_", "-")


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
    fan_out: FanOut | None = None  # flows run its parts as parallel tasks, then the merge
    tables_file: str | None = None  # JSON {name: rows} in its artifact, published as Prefect tables
    composite: str | None = "pipeline"  # the composite flow that runs it (None: its own flow and DVC stage only)
    cli: CliVariant | None = None  # another mode of its `crucible` command
    dvc_file: str = "dvc.yaml"  # the DVC pipeline that holds its stage (real/dvc.yaml: `dvc repro real/dvc.yaml`)
    params_file: str = DEFAULT_PARAMS_FILE  # the params file its flow, command and DVC stage read by default

    def config(self, params: PipelineParams) -> StrictConfig:
        return self.build_config(params) if self.build_config else getattr(params, self.section)

    @property
    def flow_attribute(self) -> str:
        """Its flow's module-level name in flows/pipeline.py and flows/entrypoints.py (deployments' entrypoint)."""
        return f"{self.name}_flow"

    def task_components(self) -> tuple[tuple[ComponentSpec, Callable[..., Manifest]], ...]:
        """The components flow tasks run for it: its own, or its fan-out's part and merge."""
        if self.fan_out is None:
            return ((self.spec, self.entry),)
        return (self.fan_out.part, self.fan_out.run_part), (self.fan_out.merge, self.fan_out.run_merge)

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


DEMO_STAGES: tuple[Stage, ...] = (
    Stage("curate", "curate", curate.SPEC, curate.curate,
          {"input": "data.raw_train", "decontaminate_against": "data.raw_heldout"},
          "Filter, redact PII, decontaminate against the held-out set, exact- and fuzzy-dedup the training records.",
          fan_out=CURATE_FAN_OUT, tables_file=curate.TABLES_FILE),
    Stage("curate_heldout", "curate_heldout", curate.SPEC, curate.curate, {"input": "data.raw_heldout"},
          "Normalise the held-out records (evaluation data: no filtering).", fan_out=CURATE_FAN_OUT),
    Stage("tokenizer", "tokenizer", tokenizer.SPEC, tokenizer.train_tokenizer, {"dataset": "curate"},
          "Train a byte-level BPE tokenizer with a chat template."),
    Stage("pack", "pack", pack.SPEC, pack.pack, {"dataset": "curate", "tokenizer": "tokenizer"},
          "Tokenize and pack documents into fixed-length blocks."),
    Stage("estimate", "estimate", feasibility.SPEC, feasibility.estimate_training, {"tokenizer": "tokenizer"},
          "Estimate FLOPs, memory, time and cost of the pretraining run; the gate pretrain checks.",
          build_config=training_estimate_config, markdown_file=ESTIMATE_REPORT, cli=ESTIMATE_CLI),
    Stage("pretrain", "pretrain", pretrain.SPEC, pretrain.pretrain,
          {"blocks": "pack", "tokenizer": "tokenizer", "estimate": "estimate"},
          "Pretrain a Llama-architecture causal LM from a config (refused if the estimate says it does not fit).",
          markdown_file=TRAIN_REPORT_FILE),
    Stage("evaluate", "evaluate", perplexity.SPEC, perplexity.evaluate_perplexity,
          {"model": "pretrain", "dataset": "curate_heldout", "blocks": "pack"},
          "Held-out perplexity with uniform and unigram baselines."),
    Stage("report", "report", report.SPEC, report.report, {"evaluation": "evaluate", "model": "pretrain"},
          "Markdown report, metrics.json and the loss curve.", markdown_file=report.REPORT_FILE,
          cli=REPORT_CLI),
    Stage("sft_data", "sft_data", sft_data.SPEC, sft_data.sft_data,
          {"dataset": "data.raw_train", "tokenizer": "tokenizer", "select": "curate"},
          "Chat-template the curated training records, mask all but the assistant tokens, pack whole examples."),
    Stage("sft", "sft", sft.SPEC, sft.sft, {"blocks": "sft_data", "model": "pretrain"},
          "Supervised fine-tuning of the pretrained model (completion-only loss; full or LoRA).",
          markdown_file=TRAIN_REPORT_FILE),
    Stage("evaluate_sft", "evaluate_sft", accuracy.SPEC, accuracy.evaluate_accuracy,
          {"model": "sft", "dataset": "data.raw_heldout"},
          "Verifiable accuracy of the SFT model: greedy, pass@k, best-of-n, majority vote, calculator, self-reflection.",
          markdown_file=accuracy.REPORT_FILE),
    Stage("arithmetic_task", "arithmetic_task", arithmetic.SPEC, arithmetic.arithmetic_task, {},
          "Generate the seeded arithmetic word-problem task (GSM8K format) that RL and test-time compute are studied on."),
    Stage("arithmetic_sft_data", "arithmetic_sft_data", sft_data.SPEC, sft_data.sft_data,
          {"dataset": "arithmetic_task/train.jsonl", "tokenizer": "tokenizer"},
          "Chat-template and pack the arithmetic task's worked solutions for SFT."),
    Stage("arithmetic_sft", "arithmetic_sft", sft.SPEC, sft.sft, {"blocks": "arithmetic_sft_data", "model": "pretrain"},
          "Fine-tune the pretrained model on the arithmetic task: the starting point of RL.", markdown_file=TRAIN_REPORT_FILE),
    Stage("grpo", "grpo", grpo.SPEC, grpo.grpo,
          {"model": "arithmetic_sft", "problems": "arithmetic_task/train.jsonl",
           "heldout": "arithmetic_task/validation.jsonl"},
          "RL with verifiable rewards (GRPO) from the SFT model; held-out accuracy before, during and after.",
          markdown_file=TRAIN_REPORT_FILE),
    Stage("grpo_study", "grpo_study", grpo_study.SPEC, grpo_study.grpo_study,
          {"model": "arithmetic_sft", "problems": "arithmetic_task/train.jsonl",
           "heldout": "arithmetic_task/validation.jsonl"},
          "Does GRPO learn? The GRPO run over several seeds: held-out accuracy vs step, mean +- std (`make rl-demo`).",
          fan_out=GRPO_STUDY_FAN_OUT, markdown_file=grpo_study.REPORT_FILE, composite="rl_studies"),
    Stage("evaluate_arithmetic_sft", "evaluate_arithmetic", accuracy.SPEC, accuracy.evaluate_accuracy,
          {"model": "arithmetic_sft", "dataset": "arithmetic_task/test.jsonl"},
          "Verifiable accuracy and test-time compute of the arithmetic SFT model.", markdown_file=accuracy.REPORT_FILE),
    Stage("evaluate_grpo", "evaluate_arithmetic", accuracy.SPEC, accuracy.evaluate_accuracy,
          {"model": "grpo", "dataset": "arithmetic_task/test.jsonl"},
          "Verifiable accuracy and test-time compute of the GRPO model (same settings as the SFT model's).",
          markdown_file=accuracy.REPORT_FILE),
    Stage("compare_test_time_compute", "compare_test_time_compute", compare.SPEC, compare.compare_test_time_compute,
          {"evaluation": "evaluate_arithmetic_sft", "rl_evaluation": "evaluate_grpo"},
          "Accuracy against compute per query: best-of-n, majority vote, self-reflection of the SFT model vs the "
          "GRPO model with its training compute amortised over query volumes.",
          markdown_file=compare.REPORT_FILE),
    Stage("preference_pairs", "preference_pairs", preferences.SPEC, preferences.preference_pairs,
          {"model": "arithmetic_sft", "problems": "arithmetic_task/train.jsonl"},
          "Preference pairs from the verifiable task: a correct and an incorrect sampled answer to one prompt.",
          composite="rl_studies"),
    Stage("reward_model", "reward_model", reward_model.SPEC, reward_model.reward_model,
          {"pairs": "preference_pairs", "model": "arithmetic_sft"},
          "Reward model: a scalar head on the SFT model trained with the Bradley-Terry loss; held-out pair accuracy.",
          markdown_file=TRAIN_REPORT_FILE, composite="rl_studies"),
    Stage("dpo_reference", "dpo_reference", dpo.REFERENCE_SPEC, dpo.dpo_reference,
          {"pairs": "preference_pairs", "model": "arithmetic_sft"},
          "The frozen reference's log-probs of every pair, computed once and cached for DPO.",
          composite="rl_studies"),
    Stage("dpo", "dpo", dpo.SPEC, dpo.dpo, {"reference": "dpo_reference", "model": "arithmetic_sft"},
          "DPO of the SFT model on the preference pairs; held-out implicit-reward accuracy.",
          markdown_file=TRAIN_REPORT_FILE, composite="rl_studies"),
    Stage("ppo", "ppo", ppo.SPEC, ppo.ppo,
          {"model": "arithmetic_sft", "problems": "arithmetic_task/train.jsonl",
           "heldout": "arithmetic_task/validation.jsonl", "reward_model": "reward_model"},
          "RLHF with PPO: value head, frozen reference, KL penalty, GAE; rewarded by the reward model.",
          markdown_file=TRAIN_REPORT_FILE, composite="rl_studies"),
    Stage("prompt_tuning", "prompt_tuning", prompt_tuning.STUDY_SPEC, prompt_tuning.prompt_tuning_study,
          {"model": "pretrain", "dataset": "data.raw_train", "heldout": "data.raw_heldout"},
          "Prompt tuning of the frozen pretrained model: text vs random vs vocab initialisation over seeds.",
          fan_out=PROMPT_TUNING_FAN_OUT, markdown_file=prompt_tuning.STUDY_REPORT, composite=None),
)
REAL_DVC = "real/dvc.yaml"
REAL_PARAMS = "real/params.yaml"  # the real chain's settings, apart from the demo's params.yaml
REAL_GRPO_MODEL = "real_grpo_study.seeds/seed0"  # the chain goes on from the study's seed 0


def _real(name: str, section: str, spec: ComponentSpec, entry: Callable[..., Manifest], inputs: Mapping[str, str],
          help: str, **options: Any) -> Stage:
    """A stage of the real-model chain: composite `real`, DVC pipeline real/dvc.yaml, params real/params.yaml."""
    return Stage(name, section, spec, entry, inputs, help, composite=options.pop("composite", "real"),
                 dvc_file=REAL_DVC, params_file=REAL_PARAMS, **options)


def _real_evaluations(model: str, source: str, label: str) -> tuple[Stage, ...]:
    """Greedy accuracy of `source` (a stage output) on the GSM8K and arithmetic test splits."""
    return (
        _real(f"real_{model}_gsm8k", "real_evaluate_gsm8k", accuracy.SPEC, accuracy.evaluate_accuracy,
              {"model": source, "dataset": "real_splits/test.jsonl"},
              f"Greedy accuracy of the {label} on the GSM8K test subset, with its 95 % interval.",
              markdown_file=accuracy.REPORT_FILE),
        _real(f"real_{model}_arithmetic", "real_evaluate_arithmetic", accuracy.SPEC, accuracy.evaluate_accuracy,
              {"model": source, "dataset": "real_arithmetic_task/test.jsonl"},
              f"Greedy accuracy of the {label} on the arithmetic test split, with its 95 % interval.",
              markdown_file=accuracy.REPORT_FILE),
    )


REAL_STAGES: tuple[Stage, ...] = (
    _real("import_model", "import_model", importer.SPEC, importer.import_model, {"source": "data.real_model"},
          "Import a pretrained model (a .gguf file, or a transformers directory with safetensors) as a model "
          "artifact: safetensors, config, tokenizer, chat template, generation config; the source's hash in lineage."),
    _real("real_splits", "real_splits", splits.SPEC, splits.problem_splits,
          {"train": "data.raw_train", "test": "data.raw_heldout"},
          "GSM8K validation (from train, for tuning) and test (for the reported numbers) subsets; train is the rest."),
    _real("real_arithmetic_task", "real_arithmetic_task", arithmetic.SPEC, arithmetic.arithmetic_task, {},
          "The arithmetic task at the difficulty (steps, operations, operand sizes) set for the real model."),
    *_real_evaluations("base", "import_model", "imported model"),
    _real("real_sft_data", "real_sft_data", sft_data.SPEC, sft_data.sft_data,
          {"dataset": "real_splits/train.jsonl", "tokenizer": "import_model"},
          "GSM8K training chats in the imported model's own chat template, packed, loss on the answers only."),
    _real("real_heldout_data", "real_heldout_data", sft_data.SPEC, sft_data.sft_data,
          {"dataset": "real_splits/validation.jsonl", "tokenizer": "import_model"},
          "The GSM8K validation chats, one per row: what the held-out answer loss scores."),
    _real("real_base_answer_loss", "real_answer_loss", answer_loss.SPEC, answer_loss.answer_loss,
          {"model": "import_model", "examples": "real_heldout_data"},
          "Held-out loss on GSM8K validation answers of the imported model."),
    _real("real_sft", "real_sft", sft.SPEC, sft.sft, {"blocks": "real_sft_data", "model": "import_model"},
          "SFT of the imported model on GSM8K (LoRA by default; full weights without the `lora` section).",
          markdown_file=TRAIN_REPORT_FILE),
    _real("real_sft_answer_loss", "real_answer_loss", answer_loss.SPEC, answer_loss.answer_loss,
          {"model": "real_sft", "examples": "real_heldout_data"},
          "Held-out loss on GSM8K validation answers after SFT."),
    *_real_evaluations("sft", "real_sft", "SFT model"),
    _real("real_grpo_study", "real_grpo_study", grpo_study.SPEC, grpo_study.grpo_study,
          {"model": "real_sft", "problems": "real_arithmetic_task/train.jsonl",
           "heldout": "real_arithmetic_task/validation.jsonl"},
          "GRPO with the verifier's reward from the SFT model, one run per seed; validation accuracy before and after.",
          fan_out=GRPO_STUDY_FAN_OUT, markdown_file=grpo_study.REPORT_FILE),
    *_real_evaluations("grpo", REAL_GRPO_MODEL, "GRPO model (seed 0)"),
    _real("real_preference_pairs", "real_preference_pairs", preferences.SPEC, preferences.preference_pairs,
          {"model": REAL_GRPO_MODEL, "problems": "real_arithmetic_task/train.jsonl"},
          "Preference pairs from the GRPO model's own samples: a verified-correct and a wrong answer to one prompt."),
    _real("real_dpo_reference", "real_dpo_reference", dpo.REFERENCE_SPEC, dpo.dpo_reference,
          {"pairs": "real_preference_pairs", "model": REAL_GRPO_MODEL},
          "The frozen GRPO model's log-probs of every pair, for DPO."),
    _real("real_dpo", "real_dpo", dpo.SPEC, dpo.dpo, {"reference": "real_dpo_reference", "model": REAL_GRPO_MODEL},
          "DPO of the GRPO model on its own preference pairs; held-out implicit-reward accuracy before and after.",
          markdown_file=TRAIN_REPORT_FILE),
    *_real_evaluations("dpo", "real_dpo", "DPO model"),
    _real("real_sft_pools", "real_evaluate_pools", accuracy.SPEC, accuracy.evaluate_accuracy,
          {"model": "real_sft", "dataset": "real_arithmetic_task/test.jsonl"},
          "Sample pools of the SFT model on arithmetic test problems: pass@k, best-of-n, majority vote.",
          markdown_file=accuracy.REPORT_FILE),
    _real("real_grpo_pools", "real_evaluate_pools", accuracy.SPEC, accuracy.evaluate_accuracy,
          {"model": REAL_GRPO_MODEL, "dataset": "real_arithmetic_task/test.jsonl"},
          "Sample pools of the GRPO model on the same problems, same settings.", markdown_file=accuracy.REPORT_FILE),
    _real("real_compare_test_time_compute", "real_compare_test_time_compute", compare.SPEC,
          compare.compare_test_time_compute, {"evaluation": "real_sft_pools", "rl_evaluation": "real_grpo_pools"},
          "Test-time compute of the real SFT model vs GRPO with its training compute amortised.",
          markdown_file=compare.REPORT_FILE),
    _real("real_report", "real_report", chain_report.SPEC, chain_report.chain_report,
          {**{f"{model}_{task}": f"real_{model}_{task}" for model in chain_report.MODELS for task in chain_report.TASKS},
           "base_answer_loss": "real_base_answer_loss", "sft_answer_loss": "real_sft_answer_loss",
           "grpo_study": "real_grpo_study", "dpo": "real_dpo"},
          "The chain's table: accuracy with 95 % intervals per model and task, and what SFT, GRPO and DPO moved.",
          markdown_file=chain_report.REPORT_FILE),
    _real("export_model", "export_model", gguf_export.SPEC, gguf_export.export_model, {"model": "real_dpo"},
          "Export a Llama model artifact to GGUF (F32, F16 or Q8_0) for llama.cpp and Ollama.", composite=None),
)

AGENTS_DVC = "agents/dvc.yaml"
AGENTS_PARAMS = "agents/params.yaml"
AGENT_GRPO_MODEL = "agent_grpo.seeds/seed0"  # the agents evaluated after RL: each study's seed 0
AGENT_GRPO_NO_TOOLS_MODEL = "agent_grpo_no_tools.seeds/seed0"


def _agent(name: str, section: str, spec: ComponentSpec, entry: Callable[..., Manifest], inputs: Mapping[str, str],
           help: str, **options: Any) -> Stage:
    """A stage of the agents chain: composite `agents`, DVC pipeline agents/dvc.yaml, params agents/params.yaml."""
    return Stage(name, section, spec, entry, inputs, help, composite="agents", dvc_file=AGENTS_DVC,
                 params_file=AGENTS_PARAMS, **options)


def _agent_evaluation(name: str, section: str, model: str, label: str) -> Stage:
    return _agent(name, section, agent_eval.SPEC, agent_eval.evaluate_agent, {"model": model},
                  f"The {label} on the environment's test tasks: success [95 % CI], turns, tool calls, tokens and FLOPs "
                  "per solved task, by method (no tools, tools, tools + reflection over trials).",
                  markdown_file=agent_eval.REPORT_FILE)


AGENT_STAGES: tuple[Stage, ...] = (
    _agent("agent_traces", "agent_traces", agent_traces.SPEC, agent_traces.agent_traces, {"tokenizer": "import_model"},
           "Tool-use demonstrations: an expert's verified episodes of each environment's train tasks, as chats."),
    _agent("agent_sft_data", "agent_sft_data", sft_data.SPEC, sft_data.sft_data,
           {"dataset": "agent_traces/train.jsonl", "tokenizer": "import_model"},
           "Chat-template the demonstrations; labels on the assistant turns only (tool outputs masked)."),
    _agent("agent_sft", "agent_sft", sft.SPEC, sft.sft, {"blocks": "agent_sft_data", "model": "import_model"},
           "SFT of the imported model on the demonstrations: an agent that has seen tool use.",
           markdown_file=TRAIN_REPORT_FILE),
    _agent("agent_grpo", "agent_grpo", agent_grpo.STUDY_SPEC, agent_grpo.agent_grpo_study, {"model": "agent_sft"},
           "Multi-turn GRPO with tools from the SFT agent, one run per seed: held-out success before and after.",
           fan_out=AGENT_GRPO_STUDY_FAN_OUT, markdown_file=grpo_study.REPORT_FILE),
    _agent("agent_grpo_no_tools", "agent_grpo_no_tools", agent_grpo.STUDY_SPEC, agent_grpo.agent_grpo_study,
           {"model": "agent_sft"}, "The same GRPO study without tools (the agent must answer directly): the baseline.",
           fan_out=AGENT_GRPO_STUDY_FAN_OUT, markdown_file=grpo_study.REPORT_FILE),
    *(_agent_evaluation(f"evaluate_agent_{model}_{env}", f"evaluate_agent_{env}", source, f"{label} ({env})")
      for model, source, label in (("base", "import_model", "imported model"), ("sft", "agent_sft", "SFT agent"))
      for env in ("arithmetic", "lookup", "gsm8k")),
    _agent_evaluation("evaluate_agent_grpo", "evaluate_agent_rl", AGENT_GRPO_MODEL, "agent after GRPO with tools"),
    _agent_evaluation("evaluate_agent_grpo_no_tools", "evaluate_agent_rl_no_tools", AGENT_GRPO_NO_TOOLS_MODEL,
                      "agent after GRPO without tools"),
    _agent("compare_agent_compute", "compare_agent_compute", compare.SPEC, compare.compare_test_time_compute,
           {"evaluation": "evaluate_agent_sft_arithmetic", "rl_evaluation": "evaluate_agent_grpo"},
           "When does RL beat more attempts? The SFT agent's tools and reflection trials vs the GRPO agent, its "
           "training compute amortised over query volumes.", markdown_file=compare.REPORT_FILE),
)
STAGES = DEMO_STAGES + REAL_STAGES + AGENT_STAGES
STAGES_BY_NAME = {stage.name: stage for stage in STAGES}
# Every component a flow task can run, by component name.
COMPONENT_ENTRIES: dict[str, tuple[ComponentSpec, Callable[..., Manifest]]] = {
    spec.name: (spec, entry) for stage in STAGES for spec, entry in stage.task_components()}


def members(composite: str) -> tuple[Stage, ...]:
    """The stages the composite flow `composite` runs, in table order."""
    return tuple(stage for stage in STAGES if stage.composite == composite)


PIPELINE_STAGES = members("pipeline")


def _origin_label(resolved: ResolvedInput) -> str:
    """The manifest's word for where an input came from."""
    return f"derived: {resolved.reason}" if resolved.origin == "derived" else resolved.origin


def run_stage(
    stage: Stage,
    params: PipelineParams,
    input_overrides: Mapping[str, str] | None = None,
    dest: str | None = None,
    overwrite: bool = False,
    layout_defaults: bool = False,
) -> Manifest:
    """Run one stage directly (the CLI's and DVC's path).

    With no input named the inputs are the params file's layout (the configured pipeline, as
    `dvc repro` runs it); once any is named the rest follow `flows.inputs.INPUT_RULES` or must
    be named too, unless `layout_defaults`. Each input's origin goes into the manifest. The
    output follows the drivers' one overwrite policy (`stage_rerun`): the previous artifact of
    this stage's component is replaced, another component's only with `overwrite`, a folder
    without a manifest never.
    """
    resolved = resolve_inputs(stage.name, stage.input_uris(params), dict(input_overrides or {}), layout_defaults)
    origins = {name: _origin_label(item) for name, item in resolved.items()}
    origins_token, rerun_token = input_origins.set(origins), stage_rerun.set(True)
    try:
        return stage.entry(stage.config(params), dest=dest or stage.dest(params), overwrite=overwrite,
                           **{name: item.uri for name, item in resolved.items()})
    finally:
        input_origins.reset(origins_token)
        stage_rerun.reset(rerun_token)
