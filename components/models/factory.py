"""Build a causal LM of a mainstream decoder family from a small typed config (no hub
download), or load one in Hugging Face format; one build or load at a time per process
(`components.locks.exclusive`).

Invariant: every family is built from the same few fields (width, depth, heads, key/value
heads, MLP width, context, RoPE base, tying) by transformers' own config and model classes,
each with its family's defining features on: Qwen2's q/k/v biases, Qwen3's and OLMo 2's q/k
RMSNorms (per head; over the whole projection), Mistral's sliding window (transformers'
4096-token default), Gemma 2's head width, logit soft-capping and four norms per layer,
Phi-3's fused qkv and gate/up projections, GPT-2's learned positions, LayerNorm and GELU MLP.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from components.config import StrictConfig
from components.locks import exclusive

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

Architecture = Literal["llama", "qwen2", "qwen3", "mistral", "gemma2", "phi3", "olmo2", "gpt2"]
# transformers' (config class, causal LM class) of each family
CLASSES: dict[str, tuple[str, str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel"),
}


class ModelConfig(StrictConfig):
    architecture: Architecture = Field("llama", description="Decoder family: " + ", ".join(CLASSES) + ".")
    hidden_size: int = Field(256, gt=0, description="Model width d_model.")
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(4, gt=0, description="Key/value heads (GQA when fewer than num_heads).")
    intermediate_size: int = Field(688, gt=0, description="MLP hidden width (SwiGLU; GeGLU for gemma2, GELU for gpt2).")
    max_position_embeddings: int = Field(512, gt=0)
    rope_theta: float = Field(10_000.0, gt=0, description="RoPE base (every family but gpt2, which learns positions).")
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
        if self.architecture == "gpt2" and self.num_kv_heads != self.num_heads:
            raise ValueError(f"gpt2 has no grouped-query attention: num_kv_heads ({self.num_kv_heads}) must equal "
                             f"num_heads ({self.num_heads})")
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
    import transformers

    special_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                   "pad_token_id": tokenizer.pad_token_id}
    with exclusive():
        model_class = getattr(transformers, CLASSES[config.architecture][1])
        return model_class(hf_config(config, len(tokenizer), special_ids))


def hf_config(config: ModelConfig, vocab_size: int, special_ids: dict[str, int | None]) -> "PretrainedConfig":
    """The transformers config of `config`'s family with this vocabulary and these special ids."""
    import transformers

    config_class = getattr(transformers, CLASSES[config.architecture][0])
    if config.architecture == "gpt2":
        # no dropout, as in every other family here (GPT-2's default is 0.1)
        return config_class(vocab_size=vocab_size, n_embd=config.hidden_size, n_layer=config.num_layers,
                            n_head=config.num_heads, n_inner=config.intermediate_size,
                            n_positions=config.max_position_embeddings, tie_word_embeddings=config.tie_word_embeddings,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special_ids)
    return config_class(
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_word_embeddings,
        **special_ids,
        **_head_width(config),
    )


def _head_width(config: ModelConfig) -> dict[str, Any]:
    """Families whose head width is a field of its own (transformers' defaults are the large
    models' 128 or 256) get d_model / heads; Gemma 2 also scales its queries by it."""
    head_dim = config.hidden_size // config.num_heads
    if config.architecture in ("qwen3", "mistral"):
        return {"head_dim": head_dim}
    if config.architecture == "gemma2":
        return {"head_dim": head_dim, "query_pre_attn_scalar": head_dim}
    return {}


def output_logits(model: "PreTrainedModel", states: "torch.Tensor") -> "torch.Tensor":
    """Logits of final decoder states [..., d_model] as the model's own forward computes them: the
    output projection, then, for Gemma 2, its final soft-cap cap * tanh(logits / cap) (Gemma Team
    2024, "Gemma 2: Improving Open Language Models at a Practical Size", §2)."""
    logits = model.get_output_embeddings()(states)
    cap = getattr(model.config, "final_logit_softcapping", None)
    return logits if cap is None else (logits / cap).tanh() * cap
