"""Model shapes and exact parameter counts.

A `ModelShape` describes a dense decoder-only transformer by the parts that hold parameters:
attention projections (any head width, GQA, optional q/k/v and output biases, optional q/k
norms), a gated (SwiGLU, GeGLU) or plain (GELU) MLP with optional biases, RMSNorm or
LayerNorm (with bias), learned or rotary positions, tied or untied embeddings. That covers
the decoder families of `FAMILIES`; `shape_from_hf_config` reads their transformers configs
and checks the shape against the parameter count of the instantiated model (built on the
meta device, so a 70B config costs no memory), refusing what the shape cannot describe with
what differs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.errors import ConfigError

QKNorm = Literal["none", "per_head", "per_projection"]


class ModelShape(StrictConfig):
    num_layers: int = Field(gt=0)
    d_model: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int | None = Field(None, gt=0, description="Width of one attention head (default, filled in on "
                                                        "validation: d_model / heads; Gemma 2 and Qwen3 set it apart).")
    ffn_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    seq_len: int = Field(gt=0, description="Training sequence length in tokens.")
    mlp: Literal["swiglu", "geglu", "gelu"] = Field(
        "swiglu", description="swiglu/geglu: gated MLP (gate, up, down); gelu: two matrices (GPT-2, GPT-NeoX).")
    tie_word_embeddings: bool = False
    learned_positions: bool = Field(False, description="GPT-2 style position embedding table.")
    max_positions: int | None = Field(None, gt=0, description="Rows of the position table (default seq_len).")
    norm_bias: bool = Field(False, description="LayerNorm (weight and bias) rather than RMSNorm (weight).")
    norms_per_layer: int = Field(2, ge=1, description="Norms in a layer: 2 (pre-norm or OLMo 2's post-norm), "
                                                      "4 (Gemma 2: pre and post around attention and MLP).")
    qkv_bias: bool = Field(False, description="Biases on the q, k, v projections (GPT-2, Qwen2, attention_bias).")
    o_bias: bool = Field(False, description="Bias on the attention output projection.")
    mlp_bias: bool = Field(False, description="Biases on the MLP projections (GPT-2, GPT-NeoX, Llama mlp_bias).")
    qk_norm: QKNorm = Field("none", description="Norms on queries and keys: per_head (Qwen3, one head wide, shared "
                                                "by the heads) or per_projection (OLMo 2, over all heads).")
    fused_projections: bool = Field(False, description="q/k/v (and a gated MLP's gate/up) held as one matrix "
                                                       "(GPT-2, GPT-NeoX, Phi-3): what ZeRO-3 gathers at once.")

    @model_validator(mode="before")
    @classmethod
    def _default_head_dim(cls, data: Any) -> Any:
        if not isinstance(data, dict) or data.get("head_dim") is not None:
            return data
        try:
            d_model, heads = int(data["d_model"]), int(data["num_heads"])
        except (KeyError, TypeError, ValueError):
            return data  # the field validators name what is missing or malformed
        if d_model <= 0 or heads <= 0:
            return data
        if d_model % heads:
            raise ValueError(f"--heads ({heads}) must divide --d-model ({d_model})")
        return {**data, "head_dim": d_model // heads}

    @model_validator(mode="after")
    def _divisible(self) -> "ModelShape":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"--kv-heads ({self.num_kv_heads}) must divide --heads ({self.num_heads})")
        return self

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        return self.mlp != "gelu"

    def _norm_parameters(self, width: int) -> int:
        return width * (2 if self.norm_bias else 1)

    def attention_parameters(self) -> int:
        q, kv, d = self.q_dim, self.kv_dim, self.d_model
        weights = d * q + 2 * d * kv + q * d
        biases = (q + 2 * kv if self.qkv_bias else 0) + (d if self.o_bias else 0)
        qk_norms = {"none": 0, "per_head": 2 * self.head_dim, "per_projection": q + kv}[self.qk_norm]
        return weights + biases + self._norm_parameters(1) * qk_norms

    def mlp_parameters(self) -> int:
        inputs = 2 if self.gated else 1
        biases = (inputs * self.ffn_dim + self.d_model) if self.mlp_bias else 0
        return (inputs + 1) * self.d_model * self.ffn_dim + biases

    def layer_parameters(self) -> int:
        return (self.attention_parameters() + self.mlp_parameters()
                + self.norms_per_layer * self._norm_parameters(self.d_model))

    def embedding_parameters(self) -> int:
        return self.vocab_size * self.d_model

    def position_parameters(self) -> int:
        return (self.max_positions or self.seq_len) * self.d_model if self.learned_positions else 0

    def outside_layer_parameters(self) -> int:
        """Embeddings, positions, the final norm and the output projection (unless tied)."""
        lm_head = 0 if self.tie_word_embeddings else self.embedding_parameters()
        return self.embedding_parameters() + self.position_parameters() + self._norm_parameters(self.d_model) + lm_head

    def parameter_count(self) -> int:
        return self.num_layers * self.layer_parameters() + self.outside_layer_parameters()

    def matmul_parameters(self) -> int:
        """Parameters that take part in a matmul per token: all but the input embedding and
        position lookups (a tied embedding counts once, as the output projection)."""
        lookups = self.position_parameters() + (0 if self.tie_word_embeddings else self.embedding_parameters())
        return self.parameter_count() - lookups

    def largest_layer_parameters(self) -> int:
        """Largest single module (what ZeRO-3 gathers at once; DeepSpeed's `model_to_params`
        walk): the embedding, a projection with its bias, or a fused q/k/v or gate/up matrix."""
        d, q, kv, ffn = self.d_model, self.q_dim, self.kv_dim, self.ffn_dim
        bias = 1 if self.qkv_bias else 0
        attention = [(d + bias) * (q + 2 * kv)] if self.fused_projections else [(d + bias) * q, (d + bias) * kv]
        mlp_in = (d + (1 if self.mlp_bias else 0)) * ffn * (2 if self.gated and self.fused_projections else 1)
        return max(self.embedding_parameters(), self.position_parameters(), *attention,
                   (q + (1 if self.o_bias else 0)) * d, mlp_in, (ffn + (1 if self.mlp_bias else 0)) * d)


def _get(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _decoder(config: Any, **family: Any) -> dict[str, Any]:
    """The fields every Llama-descended config spells the same way."""
    d_model, heads = config.hidden_size, config.num_attention_heads
    activation = _get(config, "hidden_activation", "hidden_act", default="silu")
    return {
        "num_layers": config.num_hidden_layers, "d_model": d_model, "num_heads": heads,
        "num_kv_heads": _get(config, "num_key_value_heads", default=heads),
        "head_dim": _get(config, "head_dim", default=d_model // heads), "ffn_dim": config.intermediate_size,
        "vocab_size": config.vocab_size, "mlp": "swiglu" if activation in ("silu", "swish") else "geglu",
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)), **family,
    }


def _attention_bias(config: Any) -> dict[str, bool]:
    on = bool(getattr(config, "attention_bias", False))
    return {"qkv_bias": on, "o_bias": on}


def _gpt2(config: Any) -> dict[str, Any]:
    return {"num_layers": config.n_layer, "d_model": config.n_embd, "num_heads": config.n_head,
            "num_kv_heads": config.n_head, "ffn_dim": config.n_inner or 4 * config.n_embd, "vocab_size": config.vocab_size,
            "mlp": "gelu", "tie_word_embeddings": bool(config.tie_word_embeddings), "learned_positions": True,
            "max_positions": config.n_positions, "norm_bias": True, "qkv_bias": True, "o_bias": True, "mlp_bias": True,
            "fused_projections": True}


def _gpt_neox(config: Any) -> dict[str, Any]:
    heads = config.num_attention_heads
    return {"num_layers": config.num_hidden_layers, "d_model": config.hidden_size, "num_heads": heads,
            "num_kv_heads": heads, "ffn_dim": config.intermediate_size, "vocab_size": config.vocab_size, "mlp": "gelu",
            "tie_word_embeddings": bool(config.tie_word_embeddings), "norm_bias": True, "mlp_bias": True,
            "fused_projections": True, **_attention_bias(config)}


# model_type -> the shape fields its config describes (what each family adds to Llama's layer).
FAMILIES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "llama": lambda c: _decoder(c, mlp_bias=bool(getattr(c, "mlp_bias", False)), **_attention_bias(c)),
    "mistral": lambda c: _decoder(c),
    "qwen2": lambda c: _decoder(c, qkv_bias=True),  # q/k/v biases always, no output bias
    "qwen3": lambda c: _decoder(c, qk_norm="per_head", **_attention_bias(c)),
    "gemma2": lambda c: _decoder(c, norms_per_layer=4, **_attention_bias(c)),
    "phi3": lambda c: _decoder(c, fused_projections=True),
    "olmo2": lambda c: _decoder(c, qk_norm="per_projection", **_attention_bias(c)),
    "gpt2": _gpt2,
    "gpt_neox": _gpt_neox,
}
SUPPORTED_MODEL_TYPES = set(FAMILIES)
# Families the shape cannot describe, and why (anything else unlisted is refused too).
UNSUPPORTED_REASONS = {
    **dict.fromkeys(("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe", "dbrx", "jamba",
                     "granitemoe", "phimoe"), "a mixture-of-experts MLP (per-token FLOPs count only the routed experts)"),
    **dict.fromkeys(("mamba", "mamba2", "rwkv", "recurrent_gemma"), "not an attention decoder"),
    "gemma3": "per-layer sliding/global attention and q/k norms with a vision tower",
    "falcon": "parallel attention with a shared or multi-query KV layout that varies by checkpoint",
}


def read_hf_config(config_or_path: Any) -> Any:
    """A transformers config object from itself, a config.json path or a directory holding one."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config_or_path, PretrainedConfig):
        return config_or_path
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
        return AutoConfig.for_model(**data)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"--model-config: {path}: {error}") from None


def shape_from_hf_config(config_or_path: Any, seq_len: int | None = None) -> tuple[ModelShape, int]:
    """(shape, exact parameter count) from a transformers config object or a config.json path."""
    import torch
    from transformers import AutoModelForCausalLM

    config = read_hf_config(config_or_path)
    shape = shape_of_config(config, seq_len)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    exact = sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once
    check_parameter_count(shape, exact, config.model_type, model)
    return shape, exact


def _layer_stack(model: Any, num_layers: int) -> Any | None:
    """The ModuleList of decoder layers (model.layers, transformer.h, gpt_neox.layers)."""
    import torch

    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers]
    return stacks[0] if stacks else None


def describe_difference(shape: ModelShape, model: Any) -> str:
    """Where the instantiated model and the shape disagree: per layer and outside the layers,
    with the parameters of the first layer, so a user sees what the shape misses."""
    stack = _layer_stack(model, shape.num_layers)
    if stack is None:
        return f"no stack of {shape.num_layers} layers found in {type(model).__name__}"
    per_layer = sum(p.numel() for p in stack[0].parameters())
    outside = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in stack.parameters())
    parts = ", ".join(f"{name} {tuple(p.shape)}" for name, p in stack[0].named_parameters())
    return (f"per layer: model {per_layer:,}, shape {shape.layer_parameters():,}; outside the layers: model "
            f"{outside:,}, shape {shape.outside_layer_parameters():,}; layer 0 holds {parts}")


def check_parameter_count(shape: ModelShape, exact: int, model_type: str, model: Any = None) -> None:
    if exact != shape.parameter_count():  # the shape would give wrong FLOPs and memory
        detail = f" ({describe_difference(shape, model)})" if model is not None else ""
        raise ConfigError(
            f"--model-config: the {model_type} model has {exact:,} parameters but its shape accounts for "
            f"{shape.parameter_count():,}{detail}; this variant is not supported, give the shape flags instead"
        )


def shape_of_config(config: Any, seq_len: int | None = None) -> ModelShape:
    """The shape a transformers config describes (not checked against a model: see
    `shape_from_hf_config`, or `check_parameter_count` with a model already built)."""
    model_type = config.model_type
    if model_type not in FAMILIES:
        reason = f" ({UNSUPPORTED_REASONS[model_type]})" if model_type in UNSUPPORTED_REASONS else ""
        raise ConfigError(
            f"--model-config: model_type {model_type!r} is not supported by the shape reader{reason} "
            f"(supported: {', '.join(sorted(FAMILIES))}); give the shape flags instead"
        )
    fields = FAMILIES[model_type](config)
    context = _get(config, "max_position_embeddings", "n_positions")
    try:
        return ModelShape(**fields, seq_len=seq_len or context)
    except ValueError as error:
        raise ConfigError(f"--model-config: {model_type}: {error}") from None
