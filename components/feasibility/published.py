"""Published figures the estimator is validated against (`validation.py`, tests, benchmarks/),
and small configs of every decoder family `--model-config` reads."""

from __future__ import annotations

from dataclasses import dataclass

from components.feasibility.shapes import ModelShape


def llama_shape(layers: int, d_model: int, heads: int, kv_heads: int, ffn: int, vocab: int, seq_len: int) -> ModelShape:
    return ModelShape(num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=kv_heads, ffn_dim=ffn,
                      vocab_size=vocab, seq_len=seq_len)


# Brown et al. 2020, Table 2.1: 96 layers, d_model 12288, 96 heads of 128; GPT-2's layer
# (LayerNorm, biases, GELU MLP of 4·d_model, learned positions, tied embeddings).
GPT3_175B = ModelShape(num_layers=96, d_model=12288, num_heads=96, num_kv_heads=96, ffn_dim=4 * 12288,
                       vocab_size=50257, seq_len=2048, mlp="gelu", tie_word_embeddings=True,
                       learned_positions=True, norm_bias=True, qkv_bias=True, o_bias=True, mlp_bias=True,
                       fused_projections=True)
LLAMA1_65B = llama_shape(80, 8192, 64, 64, 22016, 32000, 2048)
LLAMA2_70B = llama_shape(80, 8192, 64, 8, 28672, 32000, 4096)
LLAMA31_405B = llama_shape(126, 16384, 128, 8, 53248, 128256, 8192)


def chinchilla_shape(layers: int, d_model: int, ffn: int, heads: int, head_dim: int) -> ModelShape:
    """A model of Hoffmann et al. 2022 (Table A9): multi-head attention, a two-matrix MLP,
    RMSNorm, 32k vocabulary, 2048-token sequences. Its relative position encoding is not
    modelled; Table A4's FLOPs do not count it either."""
    return ModelShape(num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                      ffn_dim=ffn, vocab_size=32000, seq_len=2048, mlp="gelu")


@dataclass(frozen=True)
class PublishedFlops:
    """A published FLOP total (`per="run"`: FLOPs of training on `tokens`) or a published
    ratio of FLOPs to 6·N·D (`per="ratio"`, with the paper's N), in the paper's convention:
    `attention=False` when the paper leaves attention out (6ND), `logits=False` when it
    leaves out the output projection."""

    name: str
    shape: ModelShape
    published: float
    per: str
    attention: bool
    logits: bool
    tolerance: float
    source: str
    tokens: float = 0.0
    published_params: float = 0.0


PUBLISHED_FLOPS = (
    PublishedFlops(
        "GPT-3 175B, 300B tokens", GPT3_175B, 3.14e23, "run", attention=False, logits=True, tolerance=0.01, tokens=300e9,
        source="Brown et al. 2020, Table D.1 (3.14e23); App. D counts 6ND and ignores attention"),
    PublishedFlops(
        "Llama 3.1 405B, 15.6T tokens", LLAMA31_405B, 3.8e25, "run", attention=False, logits=True, tolerance=0.02,
        tokens=15.6e12,
        source="Dubey et al. 2024 (Llama 3 herd), Sec. 3.2.1 (3.8e25 = 6ND to its two figures; with attention at 8K "
               "it would read 4.1e25)"),
    *(PublishedFlops(
        f"Chinchilla-family {params / 1e6:,.0f}M (L{layers} d{d} H{heads}x{q})",
        chinchilla_shape(layers, d, ffn, heads, q), ratio, "ratio", attention=True, logits=False, tolerance=0.015,
        published_params=params,
        source="Hoffmann et al. 2022, Table A4 (FLOPs / 6ND, two decimals) with N from Table A9; the ratios hold only "
               "without the output layer, as nanoGPT's scaling_laws.ipynb also found")
      for layers, d, ffn, heads, q, params, ratio in (
          (10, 640, 2560, 10, 64, 74e6, 1.03), (20, 1024, 4096, 16, 64, 306e6, 1.10),
          (24, 1280, 5120, 10, 128, 552e6, 1.08), (26, 1792, 7168, 14, 128, 1143e6, 1.04),
          (28, 2048, 8192, 16, 128, 1593e6, 1.03), (40, 3584, 14336, 28, 128, 6796e6, 0.99))),
)


@dataclass(frozen=True)
class PublishedGpuHours:
    """GPU-hours a paper reports with the MFU range it reports for the same run. The hours may
    include time lost to failures, up to `lost_time_fraction` by the paper's own account."""

    name: str
    shape: ModelShape
    tokens: float
    gpu: str
    gpu_hours: float
    mfu_low: float
    mfu_high: float
    lost_time_fraction: float
    source: str


@dataclass(frozen=True)
class PublishedThroughput:
    """GPU-hours and the tokens/s/GPU a paper reports: their agreement is arithmetic only."""

    name: str
    shape: ModelShape
    tokens: float
    gpu: str
    gpu_hours: float
    tokens_per_s_per_gpu: float
    source: str


PUBLISHED_GPU_HOURS = (
    PublishedGpuHours(
        "Llama 3.1 405B, 15.6T tokens, H100", LLAMA31_405B, 15.6e12, "H100-SXM", 30.84e6, 0.38, 0.43, 0.10,
        source="Dubey et al. 2024, Table 4 (BF16 MFU 38-43%), Sec. 3.3.4 (>90% effective training time); "
               "model card (30.84M GPU-hours)"),
)
PUBLISHED_THROUGHPUT = (
    PublishedThroughput(
        "LLaMA-1 65B, 1.4T tokens, A100-80GB", LLAMA1_65B, 1.4e12, "A100-80GB", 1_022_362, 380.0,
        source="Touvron et al. 2023, Sec. 2.4 (380 tokens/s/GPU) and Table 15 (1,022,362 GPU-hours)"),
)

# Hoffmann et al. 2022, Table 3: (parameters, FLOPs, tokens), from Approach 1.
CHINCHILLA_TABLE_3 = ((400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                      (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                      (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12))

# Small configs of every family `--model-config` reads: (label, model_type, config kwargs),
# random-init sized (a few hundred thousand parameters) so tests instantiate them in
# milliseconds. Head widths differ from d_model / heads where the family allows it.
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILY_EXAMPLES: tuple[tuple[str, str, dict], ...] = (
    ("Llama", "llama", _SMALL),
    ("Llama, attention_bias + mlp_bias", "llama", {**_SMALL, "attention_bias": True, "mlp_bias": True}),
    ("Llama, attention_bias, tied", "llama", {**_SMALL, "attention_bias": True, "tie_word_embeddings": True}),
    ("Qwen2 (q/k/v biases)", "qwen2", _SMALL),
    ("Qwen3 (q/k norms, head_dim 24)", "qwen3", {**_SMALL, "head_dim": 24}),
    ("Mistral (head_dim 24)", "mistral", {**_SMALL, "head_dim": 24}),
    ("Gemma 2 (head_dim 24, 4 norms, tied)", "gemma2", {**_SMALL, "head_dim": 24, **_TOKENS}),
    ("Phi-3 (fused qkv, gate_up)", "phi3", {**_SMALL, **_TOKENS}),
    ("OLMo 2 (q/k norms over the projection)", "olmo2", {**_SMALL, **_TOKENS}),
    ("GPT-2", "gpt2", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, **_TOKENS)),
    ("GPT-NeoX", "gpt_neox", dict(vocab_size=128, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64, **_TOKENS)),
)
