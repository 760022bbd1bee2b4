"""Print the estimator's validation tables and write feasibility_validation.{json,md} here:

- published figures (components/feasibility/validation.py): each row, what it can catch, and
  which wrong counts (scaled by 0.9 and 1.1, the attention term dropped) fail it;
- every decoder family `--model-config` reads: parameters vs the instantiated model, forward
  FLOPs vs torch's FlopCounterMode, largest layer vs DeepSpeed's walk;
- Chinchilla's Table 3 against the scaling laws; model-state memory against DeepSpeed's
  estimators; the measured peak memory of a real CPU training step.

The report records the git commit and whether the tree (and this script, and
components/feasibility/) had local changes.

    .venv/bin/python benchmarks/feasibility_validation.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from components.feasibility.estimate import FeasibilityConfig, ModelSource, estimate
from components.feasibility.flops import forward_flops_per_token
from components.feasibility.memory import GIB, model_state_bytes
from components.feasibility.plan import ParallelPlan
from components.feasibility.published import CHINCHILLA_TABLE_3, FAMILY_EXAMPLES, llama_shape
from components.feasibility.scaling import compute_optimal
from components.feasibility.shapes import shape_from_hf_config
from components.feasibility.validation import MUTATIONS, FlopsCount, caught_by, run_checks

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def code_version() -> dict:
    """Commit, and whether the tree, this script and components/feasibility/ had local changes."""
    script = Path(__file__).resolve()
    digest = hashlib.sha256(script.read_bytes()).hexdigest()
    try:
        return {"commit": _git("rev-parse", "HEAD"), "tree_dirty": bool(_git("status", "--porcelain")),
                "script_dirty": bool(_git("status", "--porcelain", "--", str(script.relative_to(ROOT)))),
                "feasibility_dirty": bool(_git("status", "--porcelain", "--", "components/feasibility")),
                "script_sha256": digest}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "tree_dirty": None, "script_sha256": digest}


def published_checks() -> list[dict]:
    caught = caught_by()
    return [{**{k: v for k, v in vars(row).items()}, "caught_mutations": caught[row.name]} for row in run_checks()]


def mutation_test() -> list[dict]:
    """The whole validation under our count and each wrong one: it must pass only the first."""
    counts = {"our count": FlopsCount(), **MUTATIONS}
    rows = []
    for name, count in counts.items():
        failing = [row.name for row in run_checks(count) if not row.passed]
        rows.append({"count": name, "rows_failing": len(failing), "validation": "fails" if failing else "passes"})
    return rows


def model_families() -> list[dict]:
    import torch
    from deepspeed.runtime.zero.stage3 import model_to_params
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import AutoConfig, AutoModelForCausalLM

    rows = []
    for label, model_type, kwargs in FAMILY_EXAMPLES:
        config = AutoConfig.for_model(model_type, attn_implementation="eager", **kwargs)
        shape, _ = shape_from_hf_config(config)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        tokens = torch.randint(3, shape.vocab_size, (2, shape.seq_len))
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(input_ids=tokens)
        measured = counter.get_total_flops() / tokens.numel()
        rows.append({"family": label, "model_type": model_type, "params_ours": shape.parameter_count(),
                     "params_instantiated": sum(p.numel() for p in model.parameters()),
                     "forward_flops_ours": forward_flops_per_token(shape), "forward_flops_flop_counter": measured,
                     "flops_ratio": forward_flops_per_token(shape) / measured,
                     "largest_layer_ours": shape.largest_layer_parameters(),
                     "largest_layer_deepspeed": model_to_params(model)[1]})
    return rows


def chinchilla() -> list[dict]:
    return [{"params": n, "flops": c, "tokens": d,
             **{law: compute_optimal(c, law)["params"] / n for law in ("epoch2024", "chinchilla", "tokens_per_param")}}
            for n, c, d in CHINCHILLA_TABLE_3]


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


def _value(quantity: str, value: float) -> str:
    return f"{value:,.0f}" if quantity == "GPU-hours" else (f"{value:.3f}" if value < 100 else f"{value:.4g}")


def checks_markdown(rows: list[dict]) -> list[str]:
    lines = ["| row | kind | quantity | published | ours | passes if published in | passes | can catch | "
             "fails under | source |", "|---|---|---|---:|---:|---:|:-:|---|---|---|"]
    for r in rows:
        ours = _value(r["quantity"], r["ours_low"]) + (
            "" if r["ours_high"] == r["ours_low"] else f" - {_value(r['quantity'], r['ours_high'])}")
        lines.append(f"| {r['name']} | {r['kind']} | {r['quantity']} | {_value(r['quantity'], r['published'])} | {ours} | "
                     f"[{_value(r['quantity'], r['accepted_low'])}, {_value(r['quantity'], r['accepted_high'])}] | "
                     f"{'yes' if r['passed'] else 'NO'} | {r['can_catch']} | {', '.join(r['caught_mutations']) or 'none'} "
                     f"| {r['source']} |")
    return lines


def families_markdown(rows: list[dict]) -> list[str]:
    lines = ["| family | parameters (ours) | instantiated | forward FLOPs/token ours / FlopCounterMode | "
             "largest layer ours / DeepSpeed |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['family']} | {r['params_ours']:,} | {r['params_instantiated']:,} | {r['flops_ratio']:.4f} | "
              f"{r['largest_layer_ours']:,} / {r['largest_layer_deepspeed']:,} |" for r in rows]
    return lines


def other_markdown(results: dict) -> list[str]:
    lines = ["| Table 3 params | FLOPs | epoch2024 / table | chinchilla (approach 3) / table | 20 tokens/param / table |",
             "|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['params']:.3g} | {r['flops']:.3g} | {r['epoch2024']:.3f} | {r['chinchilla']:.3f} | "
              f"{r['tokens_per_param']:.3f} |" for r in results["chinchilla_table_3"]]
    lines += ["", "| params | GPUs | offload | ZeRO-2 ours | ZeRO-2 DeepSpeed | ZeRO-3 ours | ZeRO-3 DeepSpeed | (GiB per GPU) |",
              "|---:|---:|:-:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['params']:.3g} | {r['gpus']} | {r['offload']} | {r['zero2_ours_gib']:.3f} | {r['zero2_deepspeed_gib']:.3f} | "
              f"{r['zero3_ours_gib']:.3f} | {r['zero3_deepspeed_gib']:.3f} | |" for r in results["deepspeed"]]
    m = results["measured_memory"]
    return lines + ["", f"Measured peak memory growth of two fp32 AdamW steps of a {m['params'] / 1e6:.0f}M-parameter "
                        f"Llama on the CPU: {m['measured_gib']:.3f} GiB; predicted {m['predicted_gib']:.3f} GiB "
                        f"(measured / predicted = {m['ratio']:.3f})."]


def render(results: dict) -> str:
    code = results["code_version"]
    lines = [f"Written by benchmarks/feasibility_validation.py at commit {code['commit']}; working tree "
             f"{'with' if code['tree_dirty'] else 'without'} local changes (this script: "
             f"{'changed' if code['script_dirty'] else 'as committed'}, sha256 {code['script_sha256'][:12]}; "
             f"components/feasibility/: {'changed' if code['feasibility_dirty'] else 'as committed'}).", "",
             "## Published figures", "", *checks_markdown(results["published_checks"]), "",
             "Mutation test (the whole validation under each FLOPs count):", "",
             "| FLOPs count | rows failing | validation |", "|---|---:|---|"]
    lines += [f"| {r['count']} | {r['rows_failing']} | {r['validation']} |" for r in results["mutation_test"]]
    lines += ["", "## Model families (`--model-config`)", "", *families_markdown(results["model_families"]), "",
              "## Scaling laws, DeepSpeed model states, measured memory", "", *other_markdown(results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    results = {"code_version": code_version(), "published_checks": published_checks(), "mutation_test": mutation_test(),
               "model_families": model_families(), "chinchilla_table_3": chinchilla(), "deepspeed": deepspeed_states(),
               "measured_memory": measured_memory()}
    markdown = render(results)
    (HERE / "feasibility_validation.json").write_text(json.dumps(results, indent=2) + "\n")
    (HERE / "feasibility_validation.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
