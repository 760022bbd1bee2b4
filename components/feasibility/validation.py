"""The estimator checked against published figures, in a form that can fail.

Each check compares a figure a paper publishes with the same quantity from our FLOPs count,
in the paper's own convention, so a wrong count shows:
- FLOP totals and FLOP ratios (`PUBLISHED_FLOPS`): GPT-3 and Llama 3.1 publish 6·N·D, which
  leaves attention out, so those rows check the count less its attention term, i.e. the
  parameter count; Hoffmann et al.'s Table A4 counts attention (9-35 % of those models'
  FLOPs at 2048 tokens), so its rows see the attention term.
- GPU-hours with an MFU the paper publishes (`PUBLISHED_GPU_HOURS`), through the estimator's
  own time arithmetic and hardware catalog; never an MFU derived from our own count.
- Consistency checks (`PUBLISHED_THROUGHPUT`): a paper's tokens/s/GPU against its GPU-hours.
  The MFU they imply runs through our count and cancels, so these rows check arithmetic
  only and are labelled so.

`run_checks(count)` takes the count under test; `MUTATIONS` are wrong counts (scaled by 0.9
and 1.1, the attention term dropped) that the validation must reject, and `caught_by` says
which rows reject each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from components.feasibility.estimate import gpu_hours_for
from components.feasibility.flops import attention_flops_per_token, model_flops_per_token
from components.feasibility.hardware import BUILTIN_CATALOG
from components.feasibility.published import (
    PUBLISHED_FLOPS, PUBLISHED_GPU_HOURS, PUBLISHED_THROUGHPUT, PublishedFlops, PublishedGpuHours, PublishedThroughput,
)
from components.feasibility.shapes import ModelShape

PerToken = Callable[[ModelShape], float]


@dataclass(frozen=True)
class FlopsCount:
    """A training-FLOPs-per-token count under test and the attention part of it."""

    total: PerToken = model_flops_per_token
    attention: PerToken = attention_flops_per_token


def scaled(factor: float) -> FlopsCount:
    return FlopsCount(lambda s: factor * model_flops_per_token(s), lambda s: factor * attention_flops_per_token(s))


WITHOUT_ATTENTION = FlopsCount(lambda s: model_flops_per_token(s) - attention_flops_per_token(s), lambda s: 0.0)
MUTATIONS: dict[str, FlopsCount] = {"count x0.9": scaled(0.9), "count x1.1": scaled(1.1),
                                    "no attention term": WITHOUT_ATTENTION}


@dataclass(frozen=True)
class CheckResult:
    name: str
    kind: str  # "validation" or "consistency check"
    quantity: str
    published: float
    ours_low: float  # ours, or the low end where the paper gives a range (of MFU)
    ours_high: float
    accepted_low: float  # published values that pass
    accepted_high: float
    can_catch: str
    source: str
    passed: bool = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "passed", self.accepted_low <= self.published <= self.accepted_high)


def output_layer_flops_per_token(shape: ModelShape) -> float:
    """6·V·d: training FLOPs of the vocabulary projection (forward 2Vd, backward 4Vd)."""
    return 6.0 * shape.vocab_size * shape.d_model


def check_flops(row: PublishedFlops, count: FlopsCount) -> CheckResult:
    """Our count in the paper's convention against its total (FLOPs) or its ratio to 6·N·D."""
    per_token = count.total(row.shape)
    if not row.attention:
        per_token -= count.attention(row.shape)
    if not row.logits:
        per_token -= output_layer_flops_per_token(row.shape)
    ours = per_token * row.tokens if row.per == "run" else per_token / (6.0 * row.published_params)
    return CheckResult(
        name=row.name, kind="validation", quantity="training FLOPs" if row.per == "run" else "FLOPs / 6ND",
        published=row.published, ours_low=ours, ours_high=ours, accepted_low=ours * (1 - row.tolerance),
        accepted_high=ours * (1 + row.tolerance), source=row.source,
        can_catch=_flops_catch(row))


def _flops_catch(row: PublishedFlops) -> str:
    """What a FLOPs row can see: an error beyond its tolerance in the parts its convention keeps."""
    if not row.attention:
        return (f"an error over {row.tolerance:.1%} in the parameter count or the 6 FLOPs per parameter; blind to "
                f"the attention term ({attention_flops_per_token(row.shape) / model_flops_per_token(row.shape):.0%} "
                "of our count here), which the published figure leaves out")
    layers = model_flops_per_token(row.shape) - output_layer_flops_per_token(row.shape)
    return (f"an error over {row.tolerance:.1%} in the layers' FLOPs: parameter count, 6 per parameter, or the "
            f"attention term ({attention_flops_per_token(row.shape) / layers:.0%} of them here)")


def check_gpu_hours(row: PublishedGpuHours, count: FlopsCount) -> CheckResult:
    """Our GPU-hours at the paper's MFU range; its hours may exceed them by the time it lost."""
    flops = count.total(row.shape) * row.tokens
    peak = BUILTIN_CATALOG[row.gpu].peak_flops_per_s("bf16")
    fastest, slowest = gpu_hours_for(flops, row.mfu_high, peak), gpu_hours_for(flops, row.mfu_low, peak)
    return CheckResult(
        name=row.name, kind="validation", quantity="GPU-hours", published=row.gpu_hours, ours_low=fastest,
        ours_high=slowest, accepted_low=fastest, accepted_high=slowest / (1 - row.lost_time_fraction),
        source=row.source,
        can_catch=f"count or peak FLOP/s more than {row.gpu_hours / fastest - 1:.0%} high or "
                  f"{1 - row.gpu_hours * (1 - row.lost_time_fraction) / slowest:.0%} low (the MFU range and lost time "
                  "allow the rest)")


def check_throughput(row: PublishedThroughput, count: FlopsCount) -> CheckResult:
    """GPU-hours from the paper's tokens/s/GPU, passed through our count as an MFU (it cancels)."""
    peak = BUILTIN_CATALOG[row.gpu].peak_flops_per_s("bf16")
    mfu = row.tokens_per_s_per_gpu * count.total(row.shape) / peak
    ours = gpu_hours_for(count.total(row.shape) * row.tokens, mfu, peak)
    return CheckResult(
        name=row.name, kind="consistency check", quantity="GPU-hours", published=row.gpu_hours, ours_low=ours,
        ours_high=ours, accepted_low=ours * 0.99, accepted_high=ours * 1.01, source=row.source,
        can_catch="time arithmetic (tokens / throughput, hours) and the paper's own consistency; "
                  "no FLOPs-count error (the count cancels)")


def run_checks(count: FlopsCount = FlopsCount()) -> list[CheckResult]:
    return ([check_flops(row, count) for row in PUBLISHED_FLOPS]
            + [check_gpu_hours(row, count) for row in PUBLISHED_GPU_HOURS]
            + [check_throughput(row, count) for row in PUBLISHED_THROUGHPUT])


def caught_by() -> dict[str, list[str]]:
    """Row name -> the mutations of `MUTATIONS` that make it fail."""
    failing = {name: {r.name for r in run_checks(count) if not r.passed} for name, count in MUTATIONS.items()}
    return {row.name: [m for m, names in failing.items() if row.name in names] for row in run_checks()}
