"""Print the estimator's validation tables: published runs, Chinchilla Table 3, FLOPs vs
torch's FlopCounterMode, model-state memory vs DeepSpeed's estimators, and the measured
peak memory of a real CPU training step. Writes feasibility_validation.{json,md} here.

    .venv/bin/python benchmarks/feasibility_validation.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from components.feasibility.estimate import FeasibilityConfig, ModelSource, estimate
from components.feasibility.flops import forward_flops_per_token
from components.feasibility.memory import GIB, model_state_bytes
from components.feasibility.plan import ParallelPlan
from components.feasibility.published import CHINCHILLA_TABLE_3, PUBLISHED_RUNS, llama_shape
from components.feasibility.scaling import compute_optimal
from components.feasibility.shapes import shape_from_hf_config

HERE = Path(__file__).resolve().parent


def published_runs() -> list[dict]:
    rows = []
    for run in PUBLISHED_RUNS:
        result = estimate(FeasibilityConfig(model=ModelSource(shape=run.shape), tokens=run.tokens, gpu=run.gpu,
                                            num_gpus=run.num_gpus, mfu=run.mfu))
        rows.append({
            "run": run.name, "mfu": round(run.mfu, 3), "params": result["params"],
            "flops": result["training_flops"], "published_flops": run.published_flops,
            "gpu_hours": result["gpu_hours"], "published_gpu_hours": run.published_gpu_hours,
            "ratio": (result["gpu_hours"] / run.published_gpu_hours if run.published_gpu_hours
                      else result["training_flops"] / run.published_flops),
        })
    return rows


def chinchilla() -> list[dict]:
    return [{"params": n, "flops": c, "tokens": d,
             **{law: compute_optimal(c, law)["params"] / n for law in ("epoch2024", "chinchilla", "tokens_per_param")}}
            for n, c, d in CHINCHILLA_TABLE_3]


def flop_counter() -> list[dict]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoModelForCausalLM, LlamaConfig

    rows = []
    for layers, d, heads, kv, ffn, vocab, seq in [(2, 64, 4, 4, 172, 1000, 128), (3, 128, 8, 2, 344, 3000, 256),
                                                   (4, 256, 8, 8, 688, 8000, 512)]:
        config = LlamaConfig(vocab_size=vocab, hidden_size=d, intermediate_size=ffn, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq,
                             attn_implementation="eager")
        shape, _ = shape_from_hf_config(config)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            AutoModelForCausalLM.from_config(config)(input_ids=torch.randint(0, vocab, (1, seq)))
        measured = counter.get_total_flops() / seq
        rows.append({"shape": f"L{layers} d{d} H{heads}/{kv} T{seq}", "ours": forward_flops_per_token(shape),
                     "flop_counter_mode": measured, "ratio": forward_flops_per_token(shape) / measured})
    return rows


def deepspeed_states() -> list[dict]:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    rows = []
    for params, gpus in [(1.3e9, 8), (7e9, 64), (70e9, 512)]:
        p, largest = int(params), int(params // 50)
        for offload in (False, True):
            _, ds2 = estimate_zero2_model_states_mem_needs(p, 8, gpus // 8, cpu_offload=offload)
            ours2 = model_state_bytes(p, 0, 2, gpus, 8, gpus // 8, True, offload, False).total
            _, ds3, _ = estimate_zero3_model_states_mem_needs(p, largest, 8, gpus // 8, cpu_offload=offload,
                                                              cpu_offload_params=offload)
            ours3 = model_state_bytes(p, largest, 3, gpus, 8, gpus // 8, True, offload, offload).total
            rows.append({"params": params, "gpus": gpus, "offload": offload, "zero2_ours_gib": ours2 / GIB,
                         "zero2_deepspeed_gib": ds2 / GIB, "zero3_ours_gib": ours3 / GIB, "zero3_deepspeed_gib": ds3 / GIB})
    return rows


def measured_memory() -> dict:
    shape = dict(layers=12, d_model=768, heads=12, ffn=2048, vocab=8192, seq_len=512, micro_batch=4)
    out = subprocess.run([sys.executable, "-m", "components.feasibility.measure",
                          *[f"--{k.replace('_', '-')}={v}" for k, v in shape.items()]],
                         capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    source = ModelSource(shape=llama_shape(12, 768, 12, 12, 2048, 8192, 512).model_copy(update={"tie_word_embeddings": True}))
    predicted = estimate(FeasibilityConfig(model=source, tokens=1e6, gpu="CPU", num_gpus=1,
                                           plan=ParallelPlan(zero_stage=0, precision="fp32", micro_batch_size=4)))
    return {"params": measured["params"], "measured_gib": measured["peak_growth_bytes"] / GIB,
            "predicted_gib": predicted["memory_per_gpu_gib"]["total"],
            "ratio": measured["peak_growth_bytes"] / GIB / predicted["memory_per_gpu_gib"]["total"]}


def main() -> None:
    results = {"published_runs": published_runs(), "chinchilla_table_3": chinchilla(), "flop_counter": flop_counter(),
               "deepspeed": deepspeed_states(), "measured_memory": measured_memory()}
    lines = ["| run | MFU | params | training FLOPs | GPU-hours (ours) | published | ours / published |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["published_runs"]:
        published = f"{r['published_gpu_hours']:,.0f} GPU-h" if r["published_gpu_hours"] else f"{r['published_flops']:.3g} FLOPs"
        lines.append(f"| {r['run']} | {r['mfu']:.3f} | {r['params'] / 1e9:.1f}B | {r['flops']:.3g} | "
                     f"{r['gpu_hours']:,.0f} | {published} | {r['ratio']:.3f} |")
    lines += ["", "| Table 3 params | FLOPs | epoch2024 / table | chinchilla (approach 3) / table | 20 tokens/param / table |",
              "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['params']:.3g} | {r['flops']:.3g} | {r['epoch2024']:.3f} | {r['chinchilla']:.3f} | {r['tokens_per_param']:.3f} |"
              for r in results["chinchilla_table_3"]]
    lines += ["", "| shape | forward FLOPs/token (ours) | FlopCounterMode | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {r['shape']} | {r['ours']:,.0f} | {r['flop_counter_mode']:,.0f} | {r['ratio']:.4f} |" for r in results["flop_counter"]]
    lines += ["", "| params | GPUs | offload | ZeRO-2 ours | ZeRO-2 DeepSpeed | ZeRO-3 ours | ZeRO-3 DeepSpeed | (GiB per GPU) |",
              "|---:|---:|:-:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['params']:.3g} | {r['gpus']} | {r['offload']} | {r['zero2_ours_gib']:.3f} | {r['zero2_deepspeed_gib']:.3f} | "
              f"{r['zero3_ours_gib']:.3f} | {r['zero3_deepspeed_gib']:.3f} | |" for r in results["deepspeed"]]
    m = results["measured_memory"]
    lines += ["", f"Measured peak memory growth of two fp32 AdamW steps of a {m['params'] / 1e6:.0f}M-parameter Llama on the CPU: "
              f"{m['measured_gib']:.3f} GiB; predicted {m['predicted_gib']:.3f} GiB (measured / predicted = {m['ratio']:.3f})."]
    markdown = "\n".join(lines) + "\n"
    (HERE / "feasibility_validation.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "feasibility_validation.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
