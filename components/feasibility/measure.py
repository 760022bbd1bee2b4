"""Measure the peak memory of real training steps on the CPU, to check the estimator.

Run as a fresh process (`python -m components.feasibility.measure ...`) so the peak
resident set size (`ru_maxrss`) belongs to this measurement alone. With `--device cuda`
the peak is `torch.cuda.max_memory_allocated` instead. It prints one JSON
object: the resident memory before the model exists, the peak over two optimizer steps
(the second step holds weights, gradients, Adam states and activations at once), and
their difference. Run it with `MALLOC_MMAP_THRESHOLD_=65536` so glibc returns freed
buffers to the OS at once; otherwise the resident set keeps freed heap pages and
overstates the memory that was live at the peak.
"""

from __future__ import annotations

import argparse
import json
import resource

import psutil


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("layers", "d_model", "heads", "ffn", "vocab", "seq_len", "micro_batch"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cuda = args.device == "cuda"
    batch = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len), device=args.device)
    baseline_bytes = torch.cuda.memory_allocated() if cuda else psutil.Process().memory_info().rss
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.ffn, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, max_position_embeddings=args.seq_len,
        tie_word_embeddings=True, attn_implementation="sdpa",
    )).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    for _ in range(2):
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as in steady-state training
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated()
    else:
        peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "params": sum(p.numel() for p in model.parameters()),
        "baseline_rss_bytes": baseline_bytes,
        "peak_rss_bytes": peak_bytes,
        "peak_growth_bytes": peak_bytes - baseline_bytes,
    }))


if __name__ == "__main__":
    main()
