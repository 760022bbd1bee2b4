"""Build a Llama-architecture causal LM from a small typed config (no hub download), or load one
in Hugging Face format; one build or load at a time per process (`components.locks.exclusive`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.locks import exclusive

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelConfig(StrictConfig):
    architecture: Literal["llama"] = "llama"
    hidden_size: int = Field(256, gt=0, description="Model width d_model.")
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(4, gt=0, description="Key/value heads (GQA when fewer than num_heads).")
    intermediate_size: int = Field(688, gt=0, description="SwiGLU hidden width.")
    max_position_embeddings: int = Field(512, gt=0)
    rope_theta: float = Field(10_000.0, gt=0)
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        return self


def load_causal_lm(model_dir: Path | str, **kwargs: object) -> "PreTrainedModel":
    """`AutoModelForCausalLM.from_pretrained`, one load at a time in this process."""
    from transformers import AutoModelForCausalLM

    with exclusive():
        return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def build_causal_lm(config: ModelConfig, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
    """A freshly initialised model whose vocabulary and special ids match `tokenizer`.

    Seed torch before calling for reproducible weights.
    """
    with exclusive():
        return _build_causal_lm(config, tokenizer)


def _build_causal_lm(config: ModelConfig, tokenizer: "PreTrainedTokenizerBase") -> "PreTrainedModel":
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(hf_config)
