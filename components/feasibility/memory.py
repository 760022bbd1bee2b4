"""Memory per GPU: model states under ZeRO, activations, and the output layer.

Model states (bytes per parameter) follow DeepSpeed's own estimators exactly
(`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`, which
implement Rajbhandari et al. 2020, "ZeRO", Sec. 3 and 5, for mixed-precision Adam):
  bf16/fp16 params 2, bf16 grads 2, fp32 grads 4, fp32 master params 4, Adam m and v 8.
  stage 0: nothing partitioned                     -> 2 + (2 + 4) + 12          = 20 bytes/param
  stage 1: optimizer states and fp32 grads partitioned -> 2 + 2 + (4 + 12)/N
  stage 2: + bf16 grads partitioned (DeepSpeed: gpu = 2P + 18P/N)
  stage 3: + bf16 params partitioned; the largest layer is gathered, params and grads
           (DeepSpeed: gpu = 4·largest_layer + 18P/N; its 18 has no separate bf16 grad
           partition: the reduced gradient goes straight into the fp32 partition)
  optimizer offload (stage >= 1): optimizer states, fp32 grads and master params on CPU
  (DeepSpeed: 2P for stage 1-2; 4·largest + 2P/N for stage 3); parameter offload
  (stage 3 only): parameters on CPU too (DeepSpeed: 4·largest).
fp32 training (no mixed precision, e.g. on a CPU) holds params 4, grads 4, Adam 8.
torch.autocast over fp32 weights (one process, no DeepSpeed) holds params 4 and the 16-bit copy
of each weight autocast keeps for the step 2, fp32 grads 4, Adam 8: 18 bytes/param.

Activations follow Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", Sec. 4, which counts every tensor a layer keeps for its backward:
per layer sbh·(34 + 5·a·s/h) bytes for GPT-3 style layers with 16-bit activations (eq. 1),
sbh·(10 + 24/t + 5as/(ht)) with tensor parallelism t (eq. 2), sbh·(34/t + 5as/(ht))
with sequence parallelism too (eq. 4), selective recomputation drops the 5as/h term
(Sec. 5), full recomputation keeps only the layer input, 2sbh (/t with sequence
parallelism). We count the same tensors element by element so the formula also covers
GQA, SwiGLU, no dropout, fp32 and fused (flash) attention, which keeps no s x s scores;
for a GPT-3 layer in 16 bits with dropout it reduces to eq. 1 (tested). Under torch.autocast the
residual stream stays fp32: each norm keeps its fp32 input and fp32 normalised output, and each
linear layer keeps its own 16-bit copy of its input (q, k and v three, gate and up two; one
where the projections are fused), which is what autograd saves (tested against
saved_tensors_hooks on a Llama layer). Under pipeline
parallelism with 1F1B the first stage holds L layers' worth in total (Sec. 4.2.3), so
pipeline degree does not divide activation memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from components.feasibility.flops import Recompute
from components.feasibility.shapes import ModelShape

GIB = 1024**3
MASK_BYTES = 1  # dropout masks are stored as bytes (Korthikanti et al. 2022, Sec. 4.1)
CE_LOGPROB_BYTES = 4  # cross-entropy keeps fp32 log-probabilities of the logits


@dataclass(frozen=True)
class ModelStateBytes:
    weights: float
    gradients: float
    optimizer_states: float
    cpu_per_node: float  # DeepSpeed's host-memory estimate (additional_buffer_factor 1.5)

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer_states


def model_state_bytes(
    params: float,
    largest_layer_params: float,
    zero_stage: int,
    num_shards: int,
    gpus_per_node: int,
    num_nodes: int,
    mixed_precision: bool,
    offload_optimizer: bool,
    offload_params: bool,
    buffer_factor: float = 1.5,
    autocast: bool = False,
) -> ModelStateBytes:
    """Bytes per GPU for weights, gradients and optimizer states (see the module docstring).

    `params` are the parameters this GPU's model-parallel slice holds (total / (tp·pp));
    `num_shards` is the data-parallel degree ZeRO partitions across.
    """
    P, N, LL = float(params), float(num_shards), float(largest_layer_params)
    if autocast:  # fp32 weights + their 16-bit copies, fp32 grads, Adam m and v; one process, nothing partitioned
        return ModelStateBytes(6 * P, 4 * P, 8 * P, cpu_per_node=0.0)
    if not mixed_precision:  # fp32 params, grads and Adam m, v; ZeRO partitions as usual
        weights = 4 * P / (N if zero_stage >= 3 else 1)
        gradients = 4 * P / (N if zero_stage >= 2 else 1)
        optimizer = 0.0 if offload_optimizer else 8 * P / (N if zero_stage >= 1 else 1)
        return ModelStateBytes(weights, gradients, optimizer, cpu_per_node=0.0)
    if zero_stage == 0:
        return ModelStateBytes(2 * P, 6 * P, 12 * P, cpu_per_node=0.0)
    if zero_stage in (1, 2):
        if offload_optimizer:  # DeepSpeed: gpu = 2P, cpu = P·max(4·gpus, 16)·buffer
            return ModelStateBytes(2 * P, 0.0, 0.0, cpu_per_node=P * max(4 * N, 16) * buffer_factor)
        bf16_grads = 2 * P / N if zero_stage == 2 else 2 * P
        return ModelStateBytes(2 * P, bf16_grads + 4 * P / N, 12 * P / N,
                               cpu_per_node=P * 4 * gpus_per_node * buffer_factor)
    # stage 3 (DeepSpeed's estimate_zero3_model_states_mem_needs with zero_init=True)
    nodes_factor = 1.0 / num_nodes
    if offload_optimizer and offload_params:
        return ModelStateBytes(2 * LL, 2 * LL, 0.0, cpu_per_node=P * 18 * nodes_factor * buffer_factor)
    if offload_optimizer:
        return ModelStateBytes(2 * LL + 2 * P / N, 2 * LL, 0.0, cpu_per_node=P * 16 * nodes_factor * buffer_factor)
    return ModelStateBytes(2 * LL + 2 * P / N, 2 * LL + 4 * P / N, 12 * P / N,
                           cpu_per_node=LL * 4 * gpus_per_node * buffer_factor)


def activation_bytes_per_layer(
    shape: ModelShape,
    micro_batch: int,
    activation_bytes: int,
    recompute: Recompute,
    tensor_parallel: int = 1,
    sequence_parallel: bool = False,
    dropout: bool = False,
    flash_attention: bool = True,
    autocast: bool = False,
) -> float:
    """Bytes one layer keeps for backward for one micro-batch (Korthikanti et al. 2022, Sec. 4)."""
    s, b, h, t = shape.seq_len, micro_batch, shape.d_model, tensor_parallel
    tokens = s * b
    if recompute == "full":  # only the layer input is kept (Sec. 5: 2sbh, /t with SP)
        return tokens * h * activation_bytes / (t if sequence_parallel else 1)
    # Replicated across tensor-parallel ranks unless sequence parallel: each norm's input, the
    # inputs of QKV and of the MLP (the pre-norms' outputs; OLMo 2's post-norm layers feed
    # them the residual stream instead), and the two dropout masks.
    masks = 2 * h * MASK_BYTES if dropout else 0
    if autocast:  # each norm's fp32 input and output; each projection's own 16-bit copy of its input
        input_copies = 2 if shape.fused_projections else 3 + (2 if shape.gated else 1)
        replicated = shape.norms_per_layer * h * 2 * 4 + input_copies * h * activation_bytes + masks
    else:
        replicated = (shape.norms_per_layer + 2) * h * activation_bytes + masks
    # Split by tensor parallelism: Q, K, V (after projection; q/k norms keep their inputs too),
    # the attention output (input of the output projection) and the MLP hidden activations.
    mlp_hidden = 4 * shape.ffn_dim if shape.gated else 2 * shape.ffn_dim
    qk_norm_inputs = shape.q_dim + shape.kv_dim if shape.qk_norm != "none" else 0
    split = (shape.q_dim + 2 * shape.kv_dim + shape.q_dim + qk_norm_inputs + mlp_hidden) * activation_bytes
    per_token = (replicated / (t if sequence_parallel else 1)) + split / t
    layer = tokens * per_token
    if recompute == "none" and not flash_attention:  # softmax output, its dropout mask and output
        scores_per_elem = activation_bytes + ((MASK_BYTES + activation_bytes) if dropout else 0)
        layer += shape.num_heads * s * s * b * scores_per_elem / t
    return layer


def output_layer_bytes(shape: ModelShape, micro_batch: int, activation_bytes: int, tensor_parallel: int = 1) -> float:
    """Logits (activation precision) and the cross-entropy's fp32 log-probabilities."""
    return shape.seq_len * micro_batch * shape.vocab_size * (activation_bytes + CE_LOGPROB_BYTES) / tensor_parallel
