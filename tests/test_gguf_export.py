"""export_model: a Llama model artifact to GGUF with llama.cpp's names, q/k order and
tokenizer, read back by transformers' GGUF loader with the same logits (F32) or within the
rounding of F16 and Q8_0."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from components.artifacts import read_manifest
from components.errors import DataError
from components.models.chat import prompt_ids
from components.models.gguf_export import GGUF_FILE, ExportModelConfig, export_model, llama_permute
from components.models.importer import ImportModelConfig, import_model, max_abs_logit_diff

# Max |logit difference| of the tiny model read back: measured 0.0, 1.3e-4 and 4.9e-3, with
# headroom. SmolLM2's (0.0, 0.041, 1.32 over logits spanning ~70) are in README.md.
TINY_TOLERANCE = {"F32": 0.0, "F16": 1e-3, "Q8_0": 1e-2}


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-layer demo Llama (GQA: 2 query heads, 1 key/value head) imported as an artifact."""
    dest = tmp_path_factory.mktemp("export") / "artifact"
    import_model(ImportModelConfig(), str(tiny_llama_dir), str(dest))
    return dest


def read_back(gguf_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=GGUF_FILE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf_dir, gguf_file=GGUF_FILE)


def test_permutation_is_what_transformers_undoes() -> None:
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    weights = np.arange(6 * 64 * 4, dtype=np.float32).reshape(6 * 64, 4)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 2})
    for heads in (6, 2):
        permuted = llama_permute(weights[: heads * 64], heads)
        assert not np.array_equal(permuted, weights[: heads * 64])
        name = "blk.0.attn_q.weight" if heads == 6 else "blk.0.attn_k.weight"
        assert np.array_equal(processor.process(permuted, name).weights, weights[: heads * 64])


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0"])
def test_tiny_llama_round_trips(tensor_type: str, tiny_artifact: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = export_model(ExportModelConfig(tensor_type=tensor_type), str(tiny_artifact), str(tmp_path / "gguf"))

    assert manifest.inputs["model"].content_hash == read_manifest(str(tiny_artifact)).output.content_hash
    assert manifest.metrics["roundtrip_max_abs_logit_diff"] <= TINY_TOLERANCE[tensor_type]
    source = AutoModelForCausalLM.from_pretrained(tiny_artifact).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_artifact)
    exported, exported_tokenizer = read_back(tmp_path / "gguf")
    assert exported_tokenizer.chat_template == tokenizer.chat_template
    for prompt in ("What is 7 + 5?", "Ava has 12 apples. Then Ava gets 3 more."):
        ids = prompt_ids(tokenizer, prompt)
        assert prompt_ids(exported_tokenizer, prompt) == ids
        assert max_abs_logit_diff(source, exported, ids) <= TINY_TOLERANCE[tensor_type]


def test_file_follows_llama_cpp_conventions(tiny_artifact: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFReader, TokenType

    export_model(ExportModelConfig(tensor_type="Q8_0"), str(tiny_artifact), str(tmp_path / "gguf"))

    reader = GGUFReader(tmp_path / "gguf" / GGUF_FILE)
    field = {name: reader.fields[name].contents() for name in reader.fields if not name.startswith("GGUF.")}
    assert field["general.architecture"] == "llama" and field["tokenizer.ggml.model"] == "gpt2"
    assert field["tokenizer.ggml.pre"] == "gpt2" and field["llama.vocab_size"] == 400
    assert field["llama.attention.head_count"] == 2 and field["llama.attention.head_count_kv"] == 1
    tokens, types = field["tokenizer.ggml.tokens"], field["tokenizer.ggml.token_type"]
    assert types[tokens.index("<|im_end|>")] == TokenType.CONTROL and types[300] == TokenType.NORMAL
    tensors = {tensor.name: tensor.tensor_type for tensor in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd
    assert tensors["token_embd.weight"] == tensors["blk.0.attn_q.weight"] == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"] == tensors["output_norm.weight"] == GGMLQuantizationType.F32


def test_other_architectures_are_refused(tiny_artifact: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    source = tmp_path / "qwen2"
    Qwen2ForCausalLM(Qwen2Config(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_artifact).save_pretrained(source)

    with pytest.raises(DataError, match=r"qwen2'? cannot be exported to GGUF \(only llama"):
        export_model(ExportModelConfig(), str(source), str(tmp_path / "gguf"))
    assert not (tmp_path / "gguf").exists()


@pytest.mark.slow
def test_smollm2_round_trips_exactly_in_f32(smollm2_artifact: Path, tmp_path: Path) -> None:
    """The real model (9 query heads, 3 key/value heads): the same logits read back. F16 and
    Q8_0 share this code path; their tolerances are shown on the tiny model above."""
    manifest = export_model(ExportModelConfig(tensor_type="F32"), str(smollm2_artifact), str(tmp_path / "gguf"))

    assert manifest.metrics["roundtrip_max_abs_logit_diff"] == 0.0
    assert manifest.metrics["pre_tokenizer"] == "gpt2" and manifest.metrics["vocab_size"] == 49152


def test_import_and_export_commands_as_a_user_runs_them(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`crucible import_model --source DIR --output URI`, then `crucible export_model`; a bad source
    is one line naming the file, with nothing published."""
    from tests.conftest import run_cli

    run_cli("import_model", "--source", str(tiny_llama_dir), "--output", str(tmp_path / "imported"), check=True)
    assert read_manifest(str(tmp_path / "imported")).inputs["source"].uri == str(tiny_llama_dir)
    run_cli("export_model", "--model", str(tmp_path / "imported"), "--output", str(tmp_path / "gguf"), check=True)
    assert read_manifest(str(tmp_path / "gguf")).inputs["model"].uri == str(tmp_path / "imported")
    assert (tmp_path / "gguf" / GGUF_FILE).stat().st_size > 0
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    bad = run_cli("import_model", "--source", str(tmp_path / "weights.bin"), "--output", str(tmp_path / "bad"))
    assert bad.returncode != 0 and f"{tmp_path / 'weights.bin'}: not a GGUF file" in bad.stderr
    assert not (tmp_path / "bad").exists()
