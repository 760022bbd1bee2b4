"""Published training runs the estimator is validated against (tests and benchmarks/)."""

from __future__ import annotations

from dataclasses import dataclass

from components.feasibility.shapes import ModelShape
from components.feasibility.flops import model_flops_per_token


def llama_shape(layers: int, d_model: int, heads: int, kv_heads: int, ffn: int, vocab: int, seq_len: int) -> ModelShape:
    return ModelShape(num_layers=layers, d_model=d_model, num_heads=heads, num_kv_heads=kv_heads, ffn_dim=ffn,
                      vocab_size=vocab, seq_len=seq_len)


GPT3_175B = ModelShape(num_layers=96, d_model=12288, num_heads=96, num_kv_heads=96, ffn_dim=4 * 12288,
                       vocab_size=50257, seq_len=2048, mlp="gelu", tie_word_embeddings=True,
                       learned_positions=True, norm_bias=True, linear_bias=True)
LLAMA1_65B = llama_shape(80, 8192, 64, 64, 22016, 32000, 2048)
LLAMA2_70B = llama_shape(80, 8192, 64, 8, 28672, 32000, 4096)
LLAMA31_405B = llama_shape(126, 16384, 128, 8, 53248, 128256, 8192)

# LLaMA-1 (Touvron et al. 2023, Sec. 2.4): the 65B model processes ~380 tokens/s/GPU on
# 2048 A100-80GB; the MFU this implies with our FLOPs per token and the A100's 312 TFLOP/s.
LLAMA1_MFU = 380 * model_flops_per_token(LLAMA1_65B) / 312e12


@dataclass(frozen=True)
class PublishedRun:
    name: str
    shape: ModelShape
    tokens: float
    gpu: str
    num_gpus: int
    mfu: float
    published_gpu_hours: float | None
    published_flops: float | None
    source: str


PUBLISHED_RUNS = (
    PublishedRun("GPT-3 175B", GPT3_175B, 300e9, "A100-80GB", 1024, 0.4, None, 3.14e23,
                 "Brown et al. 2020, Table D.1 (3.14e23 FLOPs; trained on V100s, no GPU-hours reported)"),
    PublishedRun("LLaMA-1 65B", LLAMA1_65B, 1.4e12, "A100-80GB", 2048, LLAMA1_MFU, 1_022_362, None,
                 "Touvron et al. 2023, Table 15; MFU from the 380 tokens/s/GPU of Sec. 2.4"),
    PublishedRun("Llama 2 70B", LLAMA2_70B, 2e12, "A100-80GB", 2048, LLAMA1_MFU, 1_720_320, None,
                 "Touvron et al. 2023 (Llama 2), Table 2; MFU carried over from LLaMA-1 (same cluster type)"),
    PublishedRun("Llama 3.1 405B", LLAMA31_405B, 15.6e12, "H100-SXM", 16384, 0.38, 30.84e6, 3.8e25,
                 "Llama 3 herd paper, Table 4 (BF16 MFU 38-43%) and the model card (30.84M GPU-hours)"),
)

# Hoffmann et al. 2022, Table 3: (parameters, FLOPs, tokens), from Approach 1.
CHINCHILLA_TABLE_3 = ((400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9),
                      (67e9, 5.76e23, 1.5e12), (175e9, 3.85e24, 3.7e12), (280e9, 9.90e24, 5.9e12),
                      (520e9, 3.43e25, 11.0e12), (1e12, 1.27e26, 21.2e12), (10e12, 1.30e28, 216.2e12))
