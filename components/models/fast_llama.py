"""Lean Llama passes for the RL trainers: the rollout sampler, and a training forward that
runs each prompt once for its whole group of completions. They cover the Llama-like families
RL starts from: Llama, Mistral (while no sliding window shorter than the sequence applies),
Qwen2 (q/k/v biases) and Qwen3 (RMSNorm of each query and key head before the rotation;
Yang et al. 2025, "Qwen3 Technical Report", §2).

Small models decode at a cost set by per-operation overhead, not FLOPs: transformers' forward
builds a 4-D mask, a cache object and output records on every token. This module runs the
same mathematics (Touvron et al. 2023, "LLaMA", §2: RMSNorm pre-normalisation, rotary position
embeddings, SwiGLU) on the model's own weight tensors, with
- q, k and v projected by one matmul (their weights concatenated), gate and up likewise;
- preallocated key/value buffers ([rows, kv_heads, max_len, head_dim]) written in place;
- one boolean attention mask per step shared by every layer, and grouped-query attention
  through SDPA's `enable_gqa` instead of repeating keys and values.
`shared_prompt_logprobs` is the update's forward for G completions of one prompt: the prompt
is run once (not G times) and its keys and values are shared by the group's completions, so
with GRPO's groups the update costs prompt + G completions instead of G (prompt + completion)
tokens; gradients flow through the shared prompt as through G copies. Its vocabulary
projection runs only on sampled tokens, and its completions' attention is two batched matmuls
while the score tensor is small (`MATMUL_ATTENTION_MAX_SCORES`).
`tests/test_grpo.py` and `tests/test_families.py` check the sampler's greedy completions against
`generate` and the shared-prompt log-probs and gradients against transformers' forward. Models it
does not cover (other families, dynamic RoPE types, Llama's or Qwen3's optional attention biases,
MLP biases, a sliding window shorter than the sequence) are decoded by transformers instead
(`supports`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# The completions' attention in `shared_prompt_logprobs` is two batched matmuls when its score
# tensor [rows, heads, T, W + T] has at most this many elements, SDPA's fused kernel above it.
# Measured here (2-core CPU, bf16 autocast, 16 x 9 heads x 128 x 178): 0.58 s for 30 layers'
# forward and backward against SDPA's 1.22 s, most of it SDPA's backward. The matmuls keep the
# probabilities for the backward (about 7 bytes per score: 1.8 GB over 30 layers at this bound),
# which the fused kernel does not; above it memory wins.
MATMUL_ATTENTION_MAX_SCORES = 1 << 23


def supports(model: Any, tokens: int | None = None) -> bool:
    """Whether these passes compute `model`'s own function on sequences of `tokens` positions
    (default: its whole context)."""
    config = model.config
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    window = sliding_window(config)
    return (config.model_type in FAMILIES and rotary is not None and getattr(rotary, "rope_type", "") == "default"
            and not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
            and config.hidden_act == "silu"
            and (window is None or window >= (tokens or config.max_position_embeddings)))


def sliding_window(config: Any) -> int | None:
    """The attention window some layer applies; None when every layer sees the whole sequence.
    Qwen2/3 name each layer's kind (`layer_types`); Mistral's window, when set, holds in every
    layer. A window of w keys changes nothing on sequences of at most w positions."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None)


def _qkv_bias(attention: Any) -> torch.Tensor | None:
    """Qwen2's q, k and v biases concatenated like their weights; None for the bias-free families."""
    if attention.q_proj.bias is None:
        return None
    return torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]).detach()


def _qk_norms(attention: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Qwen3's per-head query and key RMSNorm weights; None for the families without them."""
    if getattr(attention, "q_norm", None) is None:
        return None
    return attention.q_norm.weight, attention.k_norm.weight


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device_type` now, or None outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _as(tensor: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return tensor if tensor is None or dtype is None else tensor.to(dtype)


class LlamaSampler:
    """Weights of one model snapshot; `decode` samples from it. Build it after the last update
    (the fused projections are copies)."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.eps = config.rms_norm_eps
        decoder = model.model
        self.embed = decoder.embed_tokens.weight.detach()
        self.final_norm = decoder.norm.weight.detach()
        self.head = model.lm_head.weight.detach()
        self.inv_freq = decoder.rotary_emb.inv_freq.detach().float()
        self.rope_scale = float(decoder.rotary_emb.attention_scaling)
        # Built under autocast, the matmul operands are stored in its dtype once: autocast would cast
        # them to it at every call (weights without grad are not in its cast cache), the same values.
        matmul = _autocast_dtype(self.embed.device.type)
        self.head = _as(self.head, matmul)
        self.layers = []
        for layer in decoder.layers:
            attention, mlp = layer.self_attn, layer.mlp
            norms = _qk_norms(attention)
            self.layers.append((
                layer.input_layernorm.weight.detach(),
                _as(torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach(),
                    matmul),
                _as(_qkv_bias(attention), matmul),
                None if norms is None else (norms[0].detach(), norms[1].detach()),
                _as(attention.o_proj.weight.detach(), matmul),
                layer.post_attention_layernorm.weight.detach(),
                _as(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach(), matmul),
                _as(mlp.down_proj.weight.detach(), matmul),
            ))

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [rows, 1, tokens, head_dim]
        return angles.cos() * self.rope_scale, angles.sin() * self.rope_scale

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: list[torch.Tensor], start: int,
                allowed: torch.Tensor) -> torch.Tensor:
        """Run `tokens` [rows, t] at buffer slots start..start+t; `allowed` [rows, t, start+t] is
        the attention mask. Returns the last position's logits [rows, vocab]."""
        rows, steps = tokens.shape
        end = start + steps
        hidden = F.embedding(tokens, self.embed)
        cos, sin = self._rotary(positions)
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mask = allowed[:, None]
        for index, (norm1, w_qkv, b_qkv, qk_norms, w_o, norm2, w_gate_up, w_down) in enumerate(self.layers):
            qkv = F.linear(self._norm(hidden, norm1), w_qkv, b_qkv)
            q = qkv[..., :q_width].view(rows, steps, self.heads, self.head_dim).transpose(1, 2)
            k = qkv[..., q_width:q_width + kv_width].view(rows, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            v = qkv[..., q_width + kv_width:].view(rows, steps, self.kv_heads, self.head_dim).transpose(1, 2)
            if qk_norms is not None:
                q, k = self._norm(q, qk_norms[0]), self._norm(k, qk_norms[1])
            keys, values = cache[2 * index], cache[2 * index + 1]
            keys[:, :, start:end] = self._rotate(k, cos, sin)
            values[:, :, start:end] = v
            attended = self._attend(self._rotate(q, cos, sin), keys[:, :, :end], values[:, :, :end], mask)
            hidden = hidden + F.linear(attended.transpose(1, 2).reshape(rows, steps, q_width), w_o)
            gate, up = F.linear(self._norm(hidden, norm2), w_gate_up).chunk(2, dim=-1)
            hidden = hidden + F.linear(F.silu(gate) * up, w_down)
        return F.linear(self._norm(hidden[:, -1], self.final_norm), self.head)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1), the cache held in fp32.
        One query token per row (a decode step) is `_matmul_attention` (SDPA's kernel costs more
        than the work there), its query in fp32; under autocast the two matmuls still run in bf16
        (autocast casts matmul), the softmax in fp32."""
        if q.shape[2] > 1:
            return F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=mask,
                                                  enable_gqa=self.heads != self.kv_heads)
        return _matmul_attention(q.float(), keys, values, mask).to(self.embed.dtype)

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float) -> torch.Tensor:
        """One token per row from softmax(logits / temperature) by inverting its CDF at a uniform
        draw (exact, and cheaper than torch.multinomial's exponential draws over the vocabulary);
        the argmax when temperature is 0."""
        if temperature == 0:
            return logits.argmax(dim=-1)
        cdf = torch.softmax(logits.float() / temperature, dim=-1).cumsum(dim=-1)
        draw = torch.rand(logits.shape[0], 1) * cdf[:, -1:]
        return torch.searchsorted(cdf, draw).squeeze(1).clamp(max=logits.shape[-1] - 1)

    @torch.no_grad()
    def decode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, repeats: int, max_new_tokens: int,
               temperature: float, stops: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-padded prompts [prompts, width] -> (tokens [rows, max_new_tokens], lengths, finished),
        `repeats` consecutive rows per prompt; finished rows leave the batch."""
        prompts, width = prompt_ids.shape
        rows = prompts * repeats
        total = width + max_new_tokens
        cache = [torch.empty(prompts, self.kv_heads, total, self.head_dim) for _ in range(2 * len(self.layers))]  # fp32
        valid = torch.zeros(prompts, total, dtype=torch.bool)
        valid[:, :width] = prompt_mask.bool()
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        # a padding position attends to itself only: never an empty row (SDPA would give NaN,
        # which would reach real tokens through the cache as 0 * NaN); no real token sees it
        itself = torch.eye(width, dtype=torch.bool)
        logits = self.forward(prompt_ids, positions, cache, 0, (causal[None] & valid[:, None, :width]) | itself)
        # one prefill per prompt, then its cache repeated for the group's samples
        cache = [buffer.repeat_interleave(repeats, dim=0) for buffer in cache]
        valid = valid.repeat_interleave(repeats, dim=0)
        logits = logits.repeat_interleave(repeats, dim=0)
        position = positions[:, -1].repeat_interleave(repeats, dim=0)
        tokens = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long)
        lengths = torch.zeros(rows, dtype=torch.long)
        finished = torch.zeros(rows, dtype=torch.bool)
        live = torch.arange(rows)
        for step in range(max_new_tokens):
            token = self._sample(logits, temperature)
            tokens[live, step] = token
            lengths[live] += 1
            stopped = torch.isin(token, stops)
            finished[live[stopped]] = True
            if step == max_new_tokens - 1 or bool(stopped.all()):
                break
            if bool(stopped.any()):
                kept = (~stopped).nonzero().squeeze(1)
                cache = [buffer[kept] for buffer in cache]
                live, token, valid, position = live[kept], token[kept], valid[kept], position[kept]
            slot = width + step
            valid[:, slot] = True
            position = position + 1
            logits = self.forward(token[:, None], position[:, None], cache, slot, valid[:, None, :slot + 1])
        return tokens, lengths, finished


def _weights(model: Any) -> tuple[Any, list[tuple[torch.Tensor, ...]]]:
    """The model's parameters as the training forward uses them (live tensors, with grad)."""
    decoder = model.model
    layers = []
    for layer in decoder.layers:
        attention, mlp = layer.self_attn, layer.mlp
        q_norm, k_norm = _qk_norms(attention) or (None, None)
        layers.append((layer.input_layernorm.weight, (attention.q_proj.weight, attention.q_proj.bias, q_norm),
                       (attention.k_proj.weight, attention.k_proj.bias, k_norm),
                       (attention.v_proj.weight, attention.v_proj.bias, None), attention.o_proj.weight,
                       layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                       mlp.down_proj.weight))
    return decoder, layers


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension: weight * x / sqrt(mean(x^2) + eps)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotary_cos_sin(positions: torch.Tensor, rotary: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at `positions` [rows, tokens], each [rows, 1, tokens, head_dim]."""
    freqs = positions[..., None].float() * rotary.inv_freq.float()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos() * rotary.attention_scaling, emb.sin() * rotary.attention_scaling


def _split_heads(x: torch.Tensor, count: int, head_dim: int) -> torch.Tensor:
    """[rows, tokens, count * head_dim] -> [rows, count, tokens, head_dim]."""
    return x.view(x.shape[0], x.shape[1], count, head_dim).transpose(1, 2)


def _heads(x: torch.Tensor, projection: tuple[Any, ...], count: int, head_dim: int, eps: float) -> torch.Tensor:
    """x [rows, tokens, d_model] through a (weight, bias or None, per-head norm or None)
    projection, as `count` heads [rows, count, tokens, head_dim]."""
    weight, bias, norm = projection
    heads = _split_heads(F.linear(x, weight, bias), count, head_dim)
    return heads if norm is None else _rms_norm(heads, norm, eps)


def _shared_prompt_masks(valid: torch.Tensor, width: int, rows: int, steps: int, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention masks of the prompt queries [prompts, 1, W, W] and completion queries [rows, 1, T, W + T]."""
    # prompt queries: causal over valid prompt keys (a padding query sees itself, never empty)
    prompt_allowed = ((torch.ones(width, width, dtype=torch.bool).tril()[None] & valid[:, None, :])
                      | torch.eye(width, dtype=torch.bool)[None])[:, None]
    # completion queries: every valid prompt key, then causal over the completion
    completion_allowed = torch.cat([valid.repeat_interleave(group, dim=0)[:, None, :].expand(rows, steps, width),
                                    torch.ones(steps, steps, dtype=torch.bool).tril()[None].expand(rows, -1, -1)],
                                   dim=-1)[:, None]
    return prompt_allowed, completion_allowed


def _completion_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor,
                          gqa: bool, max_scores: int = MATMUL_ATTENTION_MAX_SCORES) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v (Vaswani et al. 2017, eq. 1) for q [rows, heads, T, d]
    over keys/values [rows, kv_heads, S, d], `allowed` [rows, 1, T, S]: SDPA, or the same
    arithmetic as two batched matmuls while the scores are small (see MATMUL_ATTENTION_MAX_SCORES).
    Under autocast the matmuls run in bf16 and the softmax in fp32, as transformers' eager
    attention does; the scores are rounded to bf16 first, which SDPA's kernel does not do. Measured
    (`benchmarks/rollout_precision.md`): a bf16 sampler's log-probs against this bf16 update's
    differ by 1.8e-2 per token (mean |ratio - 1|), 2.9e-2 with SDPA."""
    rows, heads, steps, _ = q.shape
    if rows * heads * steps * keys.shape[2] > max_scores:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed, enable_gqa=gqa)
    return _matmul_attention(q, keys, values, allowed)


def _matmul_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v as two batched matmuls, softmax in fp32; shapes as in
    `_completion_attention` (grouped-query heads without repeating keys and values)."""
    rows, heads, steps, head_dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads  # query heads sharing a key/value head, consecutive as in SDPA's enable_gqa
    scores = torch.matmul(q.reshape(rows, kv_heads, group * steps, head_dim), keys.transpose(-1, -2))
    scores = (scores * head_dim ** -0.5).view(rows, kv_heads, group, steps, length)
    scores = scores.masked_fill(~allowed[:, :, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
    return torch.matmul(weights.view(rows, kv_heads, group * steps, length), values).view(rows, heads, steps, head_dim)


def _token_logprobs(logits: torch.Tensor, completion_ids: torch.Tensor, temperature: float,
                    entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `completion_ids` under softmax(logits / temperature), and optionally the entropies (no grad)."""
    if temperature > 0:
        logits = logits / temperature
    logprobs_all = torch.log_softmax(logits, dim=-1)
    logprobs = logprobs_all.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    entropies = None
    if entropy:
        with torch.no_grad():
            entropies = -(logprobs_all.exp() * logprobs_all).sum(-1)
    return logprobs, entropies


def shared_prompt_logprobs(model: Any, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           completion_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float,
                           entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs [rows, T] of `completion_ids` (G = rows / prompts consecutive rows
    per left-padded prompt in `prompt_ids` [prompts, W]) under softmax(logits / temperature),
    and optionally their distributions' entropies (no grad); 0 where `completion_mask` is 0 (the
    vocabulary projection, a fifth of a 135M model's FLOPs, runs only on sampled tokens).
    Differentiable in the model's parameters; equal to running every row as prompt + completion
    through the model."""
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    eps = config.rms_norm_eps
    decoder, layers = _weights(model)
    prompts, width = prompt_ids.shape
    rows, steps = completion_ids.shape
    group = rows // prompts
    rotary = decoder.rotary_emb
    rotate = LlamaSampler._rotate  # the sampler's rotation, the same arithmetic

    prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    completion_positions = prompt_positions[:, -1:].repeat_interleave(group, dim=0) + 1 + torch.arange(steps)
    p_cos, p_sin = _rotary_cos_sin(prompt_positions, rotary)
    c_cos, c_sin = _rotary_cos_sin(completion_positions, rotary)
    valid = prompt_mask.bool()
    prompt_allowed, completion_allowed = _shared_prompt_masks(valid, width, rows, steps, group)
    gqa = heads != kv_heads
    prompt_hidden = F.embedding(prompt_ids, decoder.embed_tokens.weight)
    hidden = F.embedding(completion_ids, decoder.embed_tokens.weight)
    for norm1, p_q, p_k, p_v, w_o, norm2, w_gate, w_up, w_down in layers:
        x_p, x_c = _rms_norm(prompt_hidden, norm1, eps), _rms_norm(hidden, norm1, eps)
        q_p = rotate(_heads(x_p, p_q, heads, head_dim, eps), p_cos, p_sin)
        k_p = rotate(_heads(x_p, p_k, kv_heads, head_dim, eps), p_cos, p_sin)
        v_p = _heads(x_p, p_v, kv_heads, head_dim, eps)
        q_c = rotate(_heads(x_c, p_q, heads, head_dim, eps), c_cos, c_sin)
        k_c = rotate(_heads(x_c, p_k, kv_heads, head_dim, eps), c_cos, c_sin)
        v_c = _heads(x_c, p_v, kv_heads, head_dim, eps)
        attended_p = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=prompt_allowed, enable_gqa=gqa)
        keys = torch.cat([k_p.repeat_interleave(group, dim=0), k_c], dim=2)
        values = torch.cat([v_p.repeat_interleave(group, dim=0), v_c], dim=2)
        attended_c = _completion_attention(q_c, keys, values, completion_allowed, gqa)
        prompt_hidden = prompt_hidden + F.linear(attended_p.transpose(1, 2).reshape(prompts, width, -1), w_o)
        hidden = hidden + F.linear(attended_c.transpose(1, 2).reshape(rows, steps, -1), w_o)
        x_p = _rms_norm(prompt_hidden, norm2, eps)
        prompt_hidden = prompt_hidden + F.linear(F.silu(F.linear(x_p, w_gate)) * F.linear(x_p, w_up), w_down)
        x_c = _rms_norm(hidden, norm2, eps)
        hidden = hidden + F.linear(F.silu(F.linear(x_c, w_gate)) * F.linear(x_c, w_up), w_down)
    # the prompt's last state predicts the first completion token; each completion state the next
    states = torch.cat([prompt_hidden[:, -1:].repeat_interleave(group, dim=0), hidden[:, :-1]], dim=1)
    scored = completion_mask.bool()  # the vocabulary projection only where a sampled token is
    logits = F.linear(_rms_norm(states[scored], decoder.norm.weight, eps), model.lm_head.weight).float()
    logprobs, entropies = _token_logprobs(logits, completion_ids[scored], temperature, entropy)
    return (torch.zeros(scored.shape, dtype=logprobs.dtype).masked_scatter(scored, logprobs),
            None if entropies is None else torch.zeros(scored.shape).masked_scatter(scored, entropies))
