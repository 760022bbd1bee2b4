"""Export a Llama model artifact to GGUF, the file llama.cpp and Ollama load.

Invariant: transformers' GGUF loader reads the exported file back as the model it came from.
The build loads it back, refuses to publish when the tokenizer read back makes other ids or
another chat template, and records `roundtrip_max_abs_logit_diff` over a probe prompt: 0.0 in
F32; in F16 and Q8_0 the rounding of the weights alone.

The file follows llama.cpp's `convert_hf_to_gguf.py` for Llama:
- tensor names from gguf's own tensor-name map (the one transformers inverts to load);
- q and k rows permuted (`LlamaModel.permute`): llama.cpp's RoPE rotates adjacent pairs
  (i, i+1), transformers' the halves (i, i + d/2), and transformers' loader undoes exactly this;
- 1-D tensors (the RMSNorm weights) kept in F32; in Q8_0 a matrix whose rows are not whole
  32-value blocks falls back to F16, as llama.cpp's converter does;
- the tied output matrix left out (llama.cpp then reads `token_embd` for it);
- the tokenizer as a byte-level BPE ("gpt2") vocabulary with its merges, each token typed
  (control for special added tokens, user-defined for other added ones, unused for padded
  embedding rows), and the `pre` name whose split transformers and llama.cpp apply, found by
  comparing splits of a probe text.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from pydantic import Field

from components.artifacts import ComponentSpec, Manifest, produce
from components.config import StrictConfig
from components.errors import DataError
from components.locks import exclusive
from components.models.chat import prompt_ids
from components.models.importer import PROBE_PROMPT, max_abs_logit_diff
from components.models.tokenizers import load_tokenizer

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGUFWriter
    from tokenizers import AddedToken
    from transformers import LlamaConfig, PreTrainedTokenizerBase

SPEC = ComponentSpec(name="export_model", version="1")
GGUF_FILE = "model.gguf"
TensorType = Literal["F32", "F16", "Q8_0"]
# llama.cpp's test text for telling pre-tokenizers apart (convert_hf_to_gguf_update.py, shortened)
PRE_TOKENIZER_PROBE = ("Hello World!  \n\n 3 33 333 3333 33333 3.14 can't I'm YOU'VE 🚀 (ŝ) ...  \t\t x\n"
                       "Ünïcödé 1234567890 ------======= нещо на Български ''''''```````\"\"\"\"")


class ExportModelConfig(StrictConfig):
    tensor_type: TensorType = Field(
        "F16", description="Storage of the matrices: F32 (exact), F16 or Q8_0 (8-bit blocks of 32); "
                           "1-D tensors stay F32.")


class Vocabulary(NamedTuple):
    """The tokenizer as GGUF stores it: one token and type per embedding row, merges, pre name."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str


def export_model(config: ExportModelConfig, model: str, dest: str, overwrite: bool = False) -> Manifest:
    """Write the Llama model artifact (or model directory) `model` as `dest/model.gguf`."""
    return produce(SPEC, config, {"model": model}, dest,
                   lambda out_dir, paths: _build(config, paths["model"], out_dir), overwrite=overwrite)


def _build(config: ExportModelConfig, model_dir: Path, out_dir: Path) -> dict[str, Any]:
    from gguf import GGUFWriter

    hf_config = llama_config(model_dir)
    tokenizer = load_tokenizer(model_dir, "model")
    vocabulary = gguf_vocabulary(model_dir, tokenizer, hf_config.vocab_size)
    path = out_dir / GGUF_FILE
    writer = GGUFWriter(path, "llama")
    _add_hyperparameters(writer, hf_config, config.tensor_type)
    _add_tokenizer(writer, tokenizer, vocabulary)
    tensor_types = _add_tensors(writer, model_dir, hf_config, config.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {
        "tensor_type": config.tensor_type,
        "gguf_bytes": path.stat().st_size,
        "gguf_tensor_types": dict(sorted(tensor_types.items())),
        "pre_tokenizer": vocabulary.pre,
        "vocab_size": len(vocabulary.tokens),
        "roundtrip_max_abs_logit_diff": roundtrip_logit_diff(model_dir, path, tokenizer),
    }


def llama_config(model_dir: Path) -> LlamaConfig:
    """The model's config, refused unless it is a Llama that GGUF's llama keys describe fully."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if config.model_type != "llama":
        raise DataError(f"{model_dir}: architecture {config.model_type!r} cannot be exported to GGUF "
                        "(only llama is, e.g. SmolLM2 and the demo models)")
    rope_type = (config.rope_parameters or {}).get("rope_type", "default")
    extras = [name for name, present in (("attention_bias", config.attention_bias), ("mlp_bias", config.mlp_bias),
                                         (f"rope_type {rope_type!r}", rope_type != "default")) if present]
    if extras:
        raise DataError(f"{model_dir}: a llama with {', '.join(extras)} is not exported to GGUF")
    return config


# --------------------------------------------------------------------------- metadata


def _add_hyperparameters(writer: GGUFWriter, config: LlamaConfig, tensor_type: TensorType) -> None:
    from gguf import GGML_QUANT_VERSION, LlamaFileType

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    file_types = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "Q8_0": LlamaFileType.MOSTLY_Q8_0}
    writer.add_file_type(file_types[tensor_type])
    writer.add_quantization_version(GGML_QUANT_VERSION)


def gguf_vocabulary(model_dir: Path, tokenizer: PreTrainedTokenizerBase, rows: int) -> Vocabulary:
    """The tokenizer's vocabulary over the model's `rows` embedding rows; only byte-level BPE."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE" or (backend.get("decoder") or {}).get("type") != "ByteLevel":
        raise DataError(f"{model_dir}: only byte-level BPE tokenizers are exported to GGUF "
                        f"(this one is {backend['model']['type']})")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if max(by_id) >= rows:
        raise DataError(f"{model_dir}: the tokenizer has ids up to {max(by_id)} but the model only {rows} "
                        "embedding rows")
    added = tokenizer.added_tokens_decoder
    tokens = [by_id.get(index, f"[PAD{index}]") for index in range(rows)]
    types = [token_type(index in by_id, added.get(index)) for index in range(rows)]
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in backend["model"]["merges"]]
    return Vocabulary(tokens, types, merges, pre_tokenizer_name(model_dir, tokenizer))


def token_type(in_vocabulary: bool, added: AddedToken | None) -> int:
    """llama.cpp's type of a token (convert_hf_to_gguf.py, `get_vocab_base`): a padded
    embedding row is unused, a special added token control, another added token user-defined."""
    from gguf import TokenType

    if not in_vocabulary:
        return int(TokenType.UNUSED)
    if added is None:
        return int(TokenType.NORMAL)
    return int(TokenType.CONTROL if added.special else TokenType.USER_DEFINED)


def pre_tokenizer_name(model_dir: Path, tokenizer: PreTrainedTokenizerBase) -> str:
    """The GGUF `pre` name whose split (as transformers' GGUF loader rebuilds it) cuts the probe
    text as this tokenizer does: "gpt2" (GPT-2's regex), else one of transformers' table."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    ours = tokenizer.backend_tokenizer.pre_tokenizer
    candidates = {"gpt2": pre_tokenizers.ByteLevel(add_prefix_space=False)} | {
        name: pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items()
    }
    if ours is not None:
        split = ours.pre_tokenize_str(PRE_TOKENIZER_PROBE)
        for name, candidate in candidates.items():
            if candidate.pre_tokenize_str(PRE_TOKENIZER_PROBE) == split:
                return name
    raise DataError(f"{model_dir}: the tokenizer's pre-tokenizer ({ours}) matches no GGUF pre-tokenizer that "
                    "transformers reads back")


def _add_tokenizer(writer: GGUFWriter, tokenizer: PreTrainedTokenizerBase, vocabulary: Vocabulary) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    writer.add_token_types(vocabulary.types)
    writer.add_token_merges(vocabulary.merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if getattr(tokenizer, f"{name}_token_id") is not None:
            add(getattr(tokenizer, f"{name}_token_id"))
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    writer.add_add_bos_token(full[:1] != plain[:1])
    writer.add_add_eos_token(full[-1:] != plain[-1:])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# --------------------------------------------------------------------------- tensors


def llama_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, `LlamaModel.permute`): within each
    head, rows [first half | second half] become interleaved pairs. weights: (heads * head_dim,
    in); `heads` is the query heads for q, the key/value heads for k."""
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _add_tensors(writer: GGUFWriter, model_dir: Path, config: LlamaConfig, tensor_type: TensorType) -> Counter[str]:
    """Every weight under its llama.cpp name, permuted and stored as `storage_type` says."""
    from gguf import MODEL_ARCH, get_tensor_name_map
    from gguf.quants import quantize

    names = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_hidden_layers)
    written: Counter[str] = Counter()
    for hf_name, tensor in _state_dict(model_dir).items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise DataError(f"{model_dir}: weight {hf_name} has no llama.cpp name")
        data = tensor.float().numpy()
        if name.endswith("attn_q.weight"):
            data = llama_permute(data, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            data = llama_permute(data, config.num_key_value_heads)
        qtype = storage_type(data, tensor_type)
        writer.add_tensor(name, quantize(data, qtype), raw_dtype=qtype)
        written[qtype.name] += 1
    return written


def storage_type(data: np.ndarray, tensor_type: TensorType) -> Any:
    """llama.cpp's rule: 1-D tensors F32; Q8_0 only where rows are whole 32-value blocks, else F16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim <= 1 or tensor_type == "F32":
        return GGMLQuantizationType.F32
    wanted = GGMLQuantizationType[tensor_type]
    block_values, _ = GGML_QUANT_SIZES[wanted]
    return wanted if data.shape[-1] % block_values == 0 else GGMLQuantizationType.F16


def _state_dict(model_dir: Path) -> dict[str, Any]:
    """Every tensor of the directory's safetensors files (the weights save_pretrained wrote)."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise DataError(f"{model_dir}: no *.safetensors weights")
    return {name: tensor for file in files for name, tensor in load_file(file).items()}


# --------------------------------------------------------------------------- round trip


def roundtrip_logit_diff(model_dir: Path, gguf_path: Path, tokenizer: PreTrainedTokenizerBase) -> float:
    """Max |logit difference| between the model and its GGUF as transformers loads it back,
    over the probe prompt; the tokenizer read back must make the same ids and chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with exclusive():
        source = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
        exported = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                        local_files_only=True, dtype=torch.float32).eval()
        read_back = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    ids = prompt_ids(tokenizer, PROBE_PROMPT)
    same_ids = all(tokenizer.encode(text) == read_back.encode(text) for text in (PRE_TOKENIZER_PROBE, PROBE_PROMPT))
    if not same_ids or prompt_ids(read_back, PROBE_PROMPT) != ids:
        raise DataError(f"{model_dir}: the tokenizer transformers reads back from the GGUF makes other token ids")
    if read_back.chat_template != tokenizer.chat_template:
        raise DataError(f"{model_dir}: the chat template read back from the GGUF differs")
    return max_abs_logit_diff(source, exported, ids)
