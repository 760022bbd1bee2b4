"""Training FLOPs per token: model FLOPs (for MFU) and hardware FLOPs (for HFU).

PaLM (Chowdhery et al. 2022), Appendix B: model FLOPs per token = 6N + 12·L·H·Q·T, with N
the parameters in matmuls, L layers, H heads, Q head dim, T sequence length. 6N is the
forward (2N) plus backward (4N) of the weight matmuls (Kaplan et al. 2020, Sec. 2.1); 12LHQT
is the forward (4LHQT: QK^T and AV, full T x T, no causal discount) and backward of attention.

Hardware FLOPs add what activation recomputation re-runs (Korthikanti et al. 2022, Sec. 5):
full recomputation repeats the whole forward (+2N + 4LHQT); selective recomputation
repeats only the attention core (+4LHQT). MFU uses model FLOPs, HFU hardware FLOPs.
"""

from __future__ import annotations

from typing import Literal

from components.feasibility.shapes import ModelShape

Recompute = Literal["none", "selective", "full"]


def attention_flops_per_token_forward(shape: ModelShape) -> float:
    """4·L·H·Q·T: QK^T and attention-times-V over the full sequence, per token, forward (Q is
    the head width, which Gemma 2 and Qwen3 set apart from d_model / H). Sliding-window layers
    (Gemma 2, Mistral) are counted over the full sequence too, as PaLM's MFU convention and
    an eager or SDPA forward do."""
    return 4.0 * shape.num_layers * shape.num_heads * shape.head_dim * shape.seq_len


def attention_flops_per_token(shape: ModelShape) -> float:
    """12·L·H·Q·T: the attention part of the training count (forward and the backward's 2x)."""
    return 3.0 * attention_flops_per_token_forward(shape)


def forward_flops_per_token(shape: ModelShape) -> float:
    return 2.0 * shape.matmul_parameters() + attention_flops_per_token_forward(shape)


def model_flops_per_token(shape: ModelShape) -> float:
    """PaLM App. B: 6N + 12LHQT."""
    return 6.0 * shape.matmul_parameters() + attention_flops_per_token(shape)


def hardware_flops_per_token(shape: ModelShape, recompute: Recompute) -> float:
    extra = {
        "none": 0.0,
        "selective": attention_flops_per_token_forward(shape),
        "full": forward_flops_per_token(shape),
    }[recompute]
    return model_flops_per_token(shape) + extra
