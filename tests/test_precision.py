"""`precision: auto` and the CPU's probed peak: auto picks bf16 autocast where the device has
bf16 units and fp32 where it has none (the capability injected, not mocked); the matmul probe
is measured once per machine key and then read from its cache; MFU is against the peak of the
precision the run used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.feasibility import cpu_probe
from components.feasibility.hardware import load_catalog
from components.models import precision as precision_module
from components.models.precision import (
    bf16_units, choose_precision, cpu_flags, emulated_bf16_warning, precision_autocast, this_cpu_bf16_units,
)
from components.train.backends import local_backend, peak_flops_per_s
from components.train.batches import TrainData
from components.train.config import TrainConfig
from components.train.engine import train
from components.train.optim import OptimConfig

CPUINFO_SPR = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx512f avx512_bf16 amx_bf16 amx_tile\n"
CPUINFO_OLD = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f\n"


def test_auto_picks_bf16_where_the_device_has_bf16_units_and_fp32_where_it_has_none() -> None:
    units = bf16_units(cpu_flags(CPUINFO_SPR))
    assert units == ["amx_bf16", "avx512_bf16"]
    assert bf16_units(cpu_flags(CPUINFO_OLD)) == []
    precision, reason = choose_precision("auto", "cpu", ", ".join(units))
    assert precision == "bf16" and "amx_bf16" in reason and "fp32 master weights" in reason
    precision, reason = choose_precision("auto", "cpu", None)
    assert precision == "fp32" and "no bf16" in reason
    assert choose_precision("auto", "cuda", "CUDA bf16, compute capability 9.0")[0] == "bf16"
    assert choose_precision("fp32", "cpu", "amx_bf16") == ("fp32", "precision: fp32 in the config")


AVX2_ONLY = {"fpu", "sse", "avx2", "fma"}


def test_explicit_bf16_runs_bf16_everywhere_and_says_so_where_the_cpu_emulates_it() -> None:
    import warnings

    import torch

    note = emulated_bf16_warning(AVX2_ONLY)
    assert "emulated" in note and "precision: auto or fp32" in note
    assert emulated_bf16_warning(AVX2_ONLY | {"avx512_bf16"}) == ""
    assert emulated_bf16_warning(set()) == ""  # flags unknown (an ARM CPU, macOS): nothing claimed
    assert choose_precision("bf16", "cpu", None, note) == ("bf16", f"precision: bf16 in the config; {note}")
    assert choose_precision("bf16", "cpu", None) == ("bf16", "precision: bf16 in the config")
    assert choose_precision("fp32", "cpu", None, note) == ("fp32", "precision: fp32 in the config")
    a = torch.ones(4, 4)
    with pytest.warns(RuntimeWarning, match="emulated"), precision_autocast("cpu", "bf16", flags=AVX2_ONLY):
        assert (a @ a).dtype == torch.bfloat16  # the config's numbers, on every machine
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning with a bf16 unit, with flags unknown, or for fp32
        with precision_autocast("cpu", "bf16", flags=AVX2_ONLY | {"amx_bf16"}):
            assert (a @ a).dtype == torch.bfloat16
        with precision_autocast("cpu", "bf16", flags=set()):
            assert (a @ a).dtype == torch.bfloat16
        with precision_autocast("cpu", "fp32", flags=AVX2_ONLY):
            assert (a @ a).dtype == torch.float32
        with precision_autocast("cpu", "bf16", flags={"amx_bf16"}), precision_autocast("cpu", "fp32"):
            assert (a @ a).dtype == torch.float32  # fp32 inside bf16 turns autocast off, as torch's does


def test_a_trainer_on_a_cpu_that_emulates_bf16_warns_and_records_why(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU is described by a /proc/cpuinfo of an AVX2-only machine (the hardware injected)."""
    import torch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(CPUINFO_OLD.replace("avx512f", "fma"), encoding="utf-8")
    monkeypatch.setattr(precision_module, "CPUINFO", cpuinfo)
    precision_module.this_cpu_flags.cache_clear()
    try:
        backend = local_backend(SumLoss(), TrainConfig(precision="bf16"))
        assert backend.precision == "bf16" and "emulated" in backend.precision_reason
        ids = torch.randint(0, 16, (2, 6), generator=torch.Generator().manual_seed(0))
        with pytest.warns(RuntimeWarning, match="emulated"):
            backend.forward_backward({"input_ids": ids, "labels": ids}, 1.0, last=True)
    finally:
        precision_module.this_cpu_flags.cache_clear()


def test_this_process_runs_what_auto_chose_for_this_cpu() -> None:
    import torch

    backend = local_backend(torch.nn.Linear(2, 2), TrainConfig())
    units = this_cpu_bf16_units()
    assert backend.precision == ("bf16" if units else "fp32")
    assert all(unit in backend.precision_reason for unit in units)
    assert local_backend(torch.nn.Linear(2, 2), TrainConfig(precision="fp32")).precision == "fp32"


def test_the_probe_measures_once_then_reads_its_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUCIBLE_PROBE_CACHE_DIR", str(tmp_path))
    path = tmp_path / cpu_probe.CACHE_FILE
    foreign = {"other CPU | 64 threads | torch 0": {"fp32_tflops": 9.0}}
    path.write_text(json.dumps(foreign), encoding="utf-8")
    measured = cpu_probe.cpu_peak()
    assert measured["key"] == cpu_probe.probe_key()
    assert 0 < measured["fp32_tflops"] and 0 < measured["bf16_tflops"]
    emulated = emulated_bf16_warning(precision_module.this_cpu_flags())  # probed smaller: seconds, not minutes
    assert measured["bf16_matmul_size"] == (cpu_probe.EMULATED_BF16_MATMUL_SIZE if emulated else cpu_probe.MATMUL_SIZE)
    cached = json.loads(path.read_text(encoding="utf-8"))
    assert cached == {**foreign, measured["key"]: measured}  # added beside other machines' probes
    # Reused, not measured again: a figure no matmul would give comes back from the cache.
    path.write_text(json.dumps({measured["key"]: {**measured, "fp32_tflops": 123.0}}), encoding="utf-8")
    assert cpu_probe.cpu_peak()["fp32_tflops"] == 123.0
    assert load_catalog()["CPU"].peak_flops_per_s("fp32") == 123.0e12


class SumLoss:
    """A bigram model whose forward returns its summed next-token cross-entropy."""

    def __new__(cls):
        import torch

        class Bigram(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.embed, self.head = torch.nn.Embedding(16, 32), torch.nn.Linear(32, 16)

            def forward(self, input_ids, labels):
                logits = self.head(self.embed(input_ids[:, :-1])).float()
                return torch.nn.functional.cross_entropy(logits.reshape(-1, 16), labels[:, 1:].reshape(-1),
                                                         reduction="sum")

        torch.manual_seed(0)
        return Bigram()


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_mfu_is_against_the_peak_of_the_precision_used(precision: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("CRUCIBLE_PROBE_CACHE_DIR", str(tmp_path))
    key = cpu_probe.probe_key()
    probe = {"key": key, "fp32_tflops": 0.5, "bf16_tflops": 2.0, "bf16_units": [], "measured_at": "then"}
    (tmp_path / cpu_probe.CACHE_FILE).write_text(json.dumps({key: probe}), encoding="utf-8")
    config = TrainConfig(max_steps=2, batch_size_rows=4, precision=precision, checkpoint_every_steps=0,
                         optim=OptimConfig(warmup_steps=1))
    assert peak_flops_per_s(config, torch.device("cpu"), precision) == {"bf16": 2.0e12, "fp32": 0.5e12}[precision]
    ids = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(0))
    result = train(SumLoss(), TrainData({"input_ids": ids, "labels": ids}), config, tmp_path / "run",
                   save_model=lambda module, directory: None, flops_per_token=1e6)
    note = emulated_bf16_warning(precision_module.this_cpu_flags()) if precision == "bf16" else ""
    assert result.precision == precision
    assert result.precision_reason == f"precision: {precision} in the config" + (f"; {note}" if note else "")
    peak = {"bf16": 2.0e12, "fp32": 0.5e12}[precision]
    for record in result.records:
        assert record["mfu"] == pytest.approx(record["tokens_per_s"] * 1e6 / peak, rel=1e-12)
