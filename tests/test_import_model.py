"""import_model: a GGUF file or a model directory in, a transformers model artifact out, with
the source's logits bit for bit, the source's hash in its lineage, and one-line errors for
bad sources with nothing published."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from components.artifacts import read_manifest
from components.errors import CrucibleError, DataError
from components.models.chat import prompt_ids
from components.models.importer import ImportModelConfig, import_model, max_abs_logit_diff

CONFIG = ImportModelConfig()


def copy_dir(source: Path, dest: Path, leave_out: tuple[str, ...] = ()) -> Path:
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns(*leave_out))
    return dest


def load(directory: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory).eval()


def test_import_directory_keeps_logits_tokenizer_and_lineage(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    manifest = import_model(CONFIG, str(tiny_llama_dir), str(tmp_path / "model"))

    source_ref = manifest.inputs["source"]
    assert source_ref.kind == "raw" and source_ref.content_hash.startswith("sha256:")
    assert manifest.metrics["source_format"] == "transformers"
    assert manifest.metrics["reload_max_abs_logit_diff"] == 0.0
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "model" / name).is_file(), name
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template
    ids = prompt_ids(tokenizer, "What is 7 + 5?")
    assert max_abs_logit_diff(load(tiny_llama_dir), load(tmp_path / "model"), ids) == 0.0
    # unchanged source, same config: reused as is
    assert import_model(CONFIG, str(tiny_llama_dir), str(tmp_path / "model")).output == manifest.output


def test_import_bare_safetensors_plus_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A state dict written by `safetensors.torch.save_file` (no metadata) beside config.json."""
    from safetensors.torch import save_file

    source = copy_dir(tiny_llama_dir, tmp_path / "bare", leave_out=("model.safetensors",))
    state = {name: tensor.contiguous() for name, tensor in load(tiny_llama_dir).state_dict().items()
             if name != "lm_head.weight"}  # tied to the embedding
    save_file(state, source / "weights.safetensors")

    rng_state = torch.get_rng_state()
    import_model(CONFIG, str(source), str(tmp_path / "model"))

    assert torch.equal(torch.get_rng_state(), rng_state)  # built from the config without drawing
    ids = list(range(10))
    assert max_abs_logit_diff(load(tiny_llama_dir), load(tmp_path / "model"), ids) == 0.0


def test_chat_template_from_the_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    source = copy_dir(tiny_llama_dir, tmp_path / "base")
    _drop_chat_template(source)
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"

    import_model(ImportModelConfig(chat_template=template), str(source), str(tmp_path / "model"))

    assert AutoTokenizer.from_pretrained(tmp_path / "model").chat_template == template


def _drop_chat_template(directory: Path) -> None:
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))


# --------------------------------------------------------------------------- bad input


def write_gguf(path: Path, architecture: str, qtype_name: str = "F32") -> Path:
    """A small GGUF with one tensor of the given type (zero bytes: only the header matters)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    qtype = GGMLQuantizationType[qtype_name]
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    writer = GGUFWriter(path, architecture)
    writer.add_block_count(1)
    raw = np.zeros((4, block_bytes), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", raw, raw_dtype=qtype)  # shape (4, block_values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bad_gguf_architecture(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return write_gguf(tmp_path / "bert.gguf", "bert")


def bad_gguf_quantisation(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return write_gguf(tmp_path / "q8k.gguf", "llama", "Q8_K")


def corrupt_gguf(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"not a gguf file at all")
    return path


def truncated_gguf(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    path = write_gguf(tmp_path / "whole.gguf", "llama", "Q8_0")
    (tmp_path / "truncated.gguf").write_bytes(path.read_bytes()[:40])
    return tmp_path / "truncated.gguf"


def no_tokenizer(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return copy_dir(tiny_llama_dir, tmp_path / "src",
                    leave_out=("tokenizer*", "special_tokens_map.json", "chat_template*"))


def no_chat_template(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    source = copy_dir(tiny_llama_dir, tmp_path / "src")
    _drop_chat_template(source)
    return source


def vocabulary_past_embedding(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    from transformers import AutoTokenizer

    source = copy_dir(tiny_llama_dir, tmp_path / "src")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(5)])
    tokenizer.save_pretrained(source)
    return source


def corrupt_weights(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    source = copy_dir(tiny_llama_dir, tmp_path / "src")
    (source / "model.safetensors").write_bytes(b"garbage")
    return source


def missing_weights(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    source = copy_dir(tiny_llama_dir, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 2}))
    return source


def wrong_shapes(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    source = copy_dir(tiny_llama_dir, tmp_path / "src")
    config = json.loads((source / "config.json").read_text())
    (source / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    return source


def bare_wrong_shapes(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    source = wrong_shapes(tmp_path, tiny_llama_dir)
    (source / "model.safetensors").rename(source / "weights.safetensors")
    return source


def pickled_weights(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    source = copy_dir(tiny_llama_dir, tmp_path / "src", leave_out=("model.safetensors",))
    torch.save({}, source / "pytorch_model.bin")
    return source


def missing_file(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    return tmp_path / "nowhere.gguf"


@pytest.mark.parametrize(("make_source", "problem"), [
    (bad_gguf_architecture, "GGUF architecture 'bert' is not supported"),
    (bad_gguf_quantisation, "GGUF tensor type Q8_K (e.g. token_embd.weight) cannot be dequantised"),
    (corrupt_gguf, "not a readable GGUF file"),
    (truncated_gguf, "not a readable GGUF file"),
    (no_tokenizer, "no tokenizer"),
    (no_chat_template, "no chat template"),
    (vocabulary_past_embedding, "the tokenizer has 405 tokens but the model's embedding has 400 rows"),
    (corrupt_weights, "cannot load the model"),
    (missing_weights, "the weights do not match config.json (missing keys: model.layers.1."),
    (wrong_shapes, "the weights do not match config.json (mismatched keys: model.layers.0.mlp."),
    (bare_wrong_shapes, "the weights do not match config.json (size mismatch for model.layers.0.mlp."),
    (pickled_weights, "no *.safetensors weights (pytorch_model.bin is a pickle"),
    (missing_file, "no such file or directory"),
], ids=lambda value: getattr(value, "__name__", ""))
def test_bad_source_is_one_line_naming_it_and_publishes_nothing(make_source, problem: str, tiny_llama_dir: Path,
                                                                 tmp_path: Path) -> None:
    source = make_source(tmp_path, tiny_llama_dir)
    dest = tmp_path / "out" / "model"

    with pytest.raises(CrucibleError) as caught:
        import_model(CONFIG, str(source), str(dest))

    message = str(caught.value)
    assert isinstance(caught.value, DataError)
    assert message.startswith(f"{source}: ") and problem in message, message
    assert "\n" not in message
    leftovers = list(dest.parent.iterdir()) if dest.parent.exists() else []  # no staging left behind either
    assert leftovers == []


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_import_matches_the_gguf_and_answers(smollm2_gguf: Path, smollm2_gguf_model,
                                                     smollm2_artifact: Path) -> None:
    from transformers import AutoTokenizer

    gguf_model, gguf_tokenizer = smollm2_gguf_model
    manifest = read_manifest(str(smollm2_artifact))
    assert manifest.inputs["source"].content_hash == "sha256:" + hashlib.sha256(smollm2_gguf.read_bytes()).hexdigest()
    assert manifest.metrics["gguf_architecture"] == "llama" and manifest.metrics["parameters"] == 134_515_008

    model, tokenizer = load(smollm2_artifact), AutoTokenizer.from_pretrained(smollm2_artifact)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    for prompt in ("What is 7 + 5?", "Name a colour."):
        ids = prompt_ids(tokenizer, prompt)
        assert ids == prompt_ids(gguf_tokenizer, prompt)
        assert max_abs_logit_diff(gguf_model, model, ids) == 0.0

    ids = torch.tensor([prompt_ids(tokenizer, "What is 7 + 5?")])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)
    assert "12" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
