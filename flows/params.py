"""`params.yaml`: the pipeline's parameters, one validated model for the CLI, flows and DVC."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from components.config import StrictConfig, load_yaml_config
from components.data.curate import CurateConfig
from components.data.pack import PackConfig
from components.data.tokenizer import TokenizerConfig
from components.eval.perplexity import PerplexityConfig
from components.feasibility.training import TrainingTarget
from components.eval.report import ReportConfig
from components.train.pretrain import PretrainConfig

DEFAULT_PARAMS_FILE = "params.yaml"


class DataPaths(StrictConfig):
    raw_train: str = Field("data/raw/gsm8k/train.jsonl", description="Raw training records (jsonl).")
    raw_heldout: str = Field("data/raw/gsm8k/test.jsonl", description="Raw held-out records (jsonl).")


class PipelineParams(StrictConfig):
    artifacts_root: str = Field("artifacts", description="Directory or s3:// prefix; each stage writes ROOT/<stage>.")
    data: DataPaths = DataPaths()
    curate: CurateConfig = CurateConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    pack: PackConfig = PackConfig()
    estimate: TrainingTarget = TrainingTarget()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: PerplexityConfig = PerplexityConfig()
    report: ReportConfig = ReportConfig()


def load_params(path: str | Path = DEFAULT_PARAMS_FILE) -> PipelineParams:
    """Validate a params file; errors name the file and the key path (`pretrain.optim.learning_rate`)."""
    return load_yaml_config(PipelineParams, path)
