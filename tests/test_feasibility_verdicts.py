"""No memory verdict without a shape; an fp8 estimate and its DeepSpeed config describe the same
run; accelerator names match case-insensitively and by common aliases."""

from __future__ import annotations

import pytest

from components.errors import ConfigError
from components.feasibility import published
from components.feasibility.estimate import FeasibilityConfig, ModelSource, estimate, render_markdown
from components.feasibility.hardware import BUILTIN_CATALOG, resolve_name
from components.feasibility.plan import ParallelPlan
from tests.conftest import run_cli

ISSUE_PLAN = ParallelPlan(zero_stage=3, micro_batch_size=16)  # 70B on 64 H100, ZeRO-3, micro-batch 16


def test_params_alone_gives_no_memory_verdict() -> None:
    result = estimate(FeasibilityConfig(model=ModelSource(params=70e9), tokens=2e12, gpu="H100-SXM", num_gpus=64,
                                        plan=ISSUE_PLAN))
    assert result["fits"] is None and result["memory_checked"] is False
    assert result["recommendation"]["fits"] is None
    assert result["recommendation"]["summary"].startswith("memory not checked: --params gives no shape")
    assert result["memory_per_gpu_gib"]["activations"] is None and result["memory_per_gpu_gib"]["total"] is None
    assert result["memory_per_gpu_gib"]["weights"] == pytest.approx(2 * 70e9 / 64 / 2**30)  # a lower bound, shown
    report = render_markdown(result)
    assert "**Memory not checked, no verdict:**" in report and "give --model-config or the shape flags" in report
    assert "Fits as configured" not in report


def test_the_same_run_with_its_shape_gets_a_verdict() -> None:
    result = estimate(FeasibilityConfig(model=ModelSource(shape=published.LLAMA2_70B), tokens=2e12, gpu="H100-SXM",
                                        num_gpus=64, plan=ISSUE_PLAN))
    assert result["fits"] is False and result["memory_per_gpu_gib"]["total"] > 1000  # activations of 16 x 4096 tokens
    assert result["recommendation"]["fits"] is True and result["recommendation"]["changes"]


def test_params_alone_sweep_says_not_checked() -> None:
    result = estimate(FeasibilityConfig(model=ModelSource(params=7e9), tokens=1e12, num_gpus=8, sweep_num_gpus=[8, 16]))
    assert [row["fits"] for row in result["sweep"]] == [None, None]
    assert "| not checked |" in render_markdown(result)


def test_fp8_estimate_and_deepspeed_config_describe_one_run() -> None:
    config = FeasibilityConfig(model=ModelSource(shape=published.LLAMA2_70B), tokens=2e12, gpu="H100-SXM",
                               num_gpus=512, plan=ParallelPlan(zero_stage=3, precision="fp8"))
    fp8 = estimate(config)
    bf16 = estimate(config.model_copy(update={"plan": ParallelPlan(zero_stage=3, precision="bf16")}))
    assert fp8["gpu_hours"] == pytest.approx(bf16["gpu_hours"] * 989 / 1979)  # H100's dense fp8 vs bf16 peaks
    assert fp8["bf16_gpu_hours"] == pytest.approx(bf16["gpu_hours"])
    assert "NVIDIA Transformer Engine" in fp8["precision_note"]
    ds = fp8["deepspeed_config"]
    assert ds["bf16"]["enabled"] and "Transformer Engine" in ds["crucible_fp8_note"]
    assert fp8["memory_per_gpu_gib"] == bf16["memory_per_gpu_gib"]  # the memory plan is the bf16 run's
    assert "fp8: the time assumes" in render_markdown(fp8)


def test_fp8_on_a_device_without_fp8_is_refused() -> None:
    with pytest.raises(ConfigError, match="precision 'fp8' has no peak on this device"):
        estimate(FeasibilityConfig(model=ModelSource(params=7e9), tokens=1e12, gpu="A100-80GB",
                                   plan=ParallelPlan(precision="fp8")))


@pytest.mark.parametrize(("typed", "entry"), [
    ("h100", "H100-SXM"), ("H100", "H100-SXM"), ("h100-sxm", "H100-SXM"), ("H100_SXM5", "H100-SXM"),
    ("h100 pcie", "H100-PCIe"), ("a100-80gb", "A100-80GB"), ("A100 40G", "A100-40GB"), ("tpu v4", "TPU-v4"),
    ("cpu", "CPU"), ("B200", "B200"), ("NVIDIA H100 SXM5", "H100-SXM"), ("nvidia-l4", "L4"),
])
def test_gpu_names_match_ignoring_case_and_by_alias(typed: str, entry: str) -> None:
    assert resolve_name(BUILTIN_CATALOG, typed) == entry


def test_an_ambiguous_or_unknown_name_is_refused() -> None:
    with pytest.raises(ConfigError, match="'a100' is ambiguous; say which: A100-40GB or A100-80GB"):
        resolve_name(BUILTIN_CATALOG, "a100")
    with pytest.raises(ConfigError, match="unknown accelerator 'Z80'; known: A100-40GB"):
        resolve_name(BUILTIN_CATALOG, "Z80")


def test_the_output_says_which_entry_an_alias_read_as() -> None:
    out = run_cli("estimate", "--params", "7e9", "--tokens", "1e12", "--gpu", "h100", check=True).stdout
    assert "--gpu 'h100' read as H100-SXM." in out and "| GPUs | 8 x H100-SXM (bf16) |" in out
