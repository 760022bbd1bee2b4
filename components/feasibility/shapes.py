"""Model shapes and exact parameter counts.

A `ModelShape` describes a dense decoder-only transformer (Llama family: RMSNorm, RoPE,
SwiGLU MLP, optional GQA; or GPT-2 style: LayerNorm with bias, learned positions, GELU MLP).
`parameter_count` is exact for both; `shape_from_hf_config` reads a transformers config and
also returns the exact count of the instantiated model (built on the meta device, so a
70B config costs no memory).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.errors import ConfigError


class ModelShape(StrictConfig):
    num_layers: int = Field(gt=0)
    d_model: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    ffn_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    seq_len: int = Field(gt=0, description="Training sequence length in tokens.")
    mlp: Literal["swiglu", "gelu"] = "swiglu"
    tie_word_embeddings: bool = False
    learned_positions: bool = Field(False, description="GPT-2 style position embedding table.")
    max_positions: int | None = Field(None, gt=0, description="Rows of the position table (default seq_len).")
    norm_bias: bool = Field(False, description="LayerNorm (bias) rather than RMSNorm.")
    linear_bias: bool = Field(False, description="Biases on attention and MLP projections.")

    @model_validator(mode="after")
    def _divisible(self) -> "ModelShape":
        if self.d_model % self.num_heads:
            raise ValueError(f"--heads ({self.num_heads}) must divide --d-model ({self.d_model})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"--kv-heads ({self.num_kv_heads}) must divide --heads ({self.num_heads})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def layer_parameters(self) -> int:
        d, kv, ffn = self.d_model, self.kv_dim, self.ffn_dim
        attention = d * d + 2 * d * kv + d * d  # q, k, v, o
        mlp = (3 if self.mlp == "swiglu" else 2) * d * ffn
        norms = 2 * d * (2 if self.norm_bias else 1)
        biases = (d + 2 * kv + d + (2 * ffn if self.mlp == "swiglu" else ffn) + d) if self.linear_bias else 0
        return attention + mlp + norms + biases

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.d_model

    def position_parameters(self) -> int:
        return (self.max_positions or self.seq_len) * self.d_model if self.learned_positions else 0

    def parameter_count(self) -> int:
        final_norm = self.d_model * (2 if self.norm_bias else 1)
        lm_head = 0 if self.tie_word_embeddings else self.embedding_parameters()
        return (self.embedding_parameters() + self.position_parameters()
                + self.num_layers * self.layer_parameters() + final_norm + lm_head)

    def matmul_parameters(self) -> int:
        """Parameters that take part in a matmul per token: all but the input embedding and
        position lookups (a tied embedding counts once, as the output projection)."""
        lookups = self.position_parameters() + (0 if self.tie_word_embeddings else self.embedding_parameters())
        return self.parameter_count() - lookups

    def largest_layer_parameters(self) -> int:
        """Largest single module (what ZeRO-3 gathers at once): the embedding or an MLP matrix."""
        return max(self.embedding_parameters(), self.d_model * self.ffn_dim, self.d_model * self.d_model)


# Decoder-only families whose layers the shape describes exactly (checked against the
# instantiated parameter count on every read).
SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2", "gpt2"}


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def shape_from_hf_config(config_or_path: Any, seq_len: int | None = None) -> tuple[ModelShape, int]:
    """(shape, exact parameter count) from a transformers config object or a config.json path."""
    from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        config = config_or_path
    else:
        path = Path(config_or_path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"--model-config: {path} not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConfigError(f"--model-config: {path}: not valid JSON ({error.msg})") from None
        if "model_type" not in data:
            raise ConfigError(f"--model-config: {path}: missing key 'model_type'")
        try:
            config = AutoConfig.for_model(**data)
        except ValueError as error:
            raise ConfigError(f"--model-config: {path}: {error}") from None
    shape = shape_of_config(config, seq_len)
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    exact = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once
    check_parameter_count(shape, exact, config.model_type)
    return shape, exact


def check_parameter_count(shape: ModelShape, exact: int, model_type: str) -> None:
    if exact != shape.parameter_count():  # the shape would give wrong FLOPs and memory
        raise ConfigError(
            f"--model-config: the {model_type} model has {exact:,} parameters but its shape accounts for "
            f"{shape.parameter_count():,}; this variant is not supported, give the shape flags instead"
        )


def shape_of_config(config: Any, seq_len: int | None = None) -> ModelShape:
    """The shape a transformers config describes (not checked against a model: see
    `shape_from_hf_config`, or `check_parameter_count` with a model already built)."""
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"--model-config: model_type {model_type!r} is not supported by the shape reader "
            f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))}); give the shape flags instead"
        )
    gpt2_style = model_type in {"gpt2"}
    d_model = _get(config, "hidden_size", "n_embd")
    heads = _get(config, "num_attention_heads", "n_head")
    shape = ModelShape(
        num_layers=_get(config, "num_hidden_layers", "n_layer"),
        d_model=d_model,
        num_heads=heads,
        num_kv_heads=_get(config, "num_key_value_heads", default=heads),
        ffn_dim=_get(config, "intermediate_size", "n_inner", default=4 * d_model),
        vocab_size=config.vocab_size,
        seq_len=seq_len or _get(config, "max_position_embeddings", "n_positions"),
        mlp="gelu" if gpt2_style else "swiglu",
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        learned_positions=gpt2_style,
        max_positions=_get(config, "n_positions") if gpt2_style else None,
        norm_bias=gpt2_style,
        linear_bias=gpt2_style or bool(getattr(config, "attention_bias", False)),
    )
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None and head_dim != shape.head_dim:
        raise ConfigError(f"--model-config: head_dim {head_dim} differs from hidden_size / heads ({shape.head_dim}); not supported")
    return shape
