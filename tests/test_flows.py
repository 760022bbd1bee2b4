"""Prefect flows on a real (temporary) Prefect API: caching, artifacts, per-stage flows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.params import load_params
from flows.stages import PIPELINE_STAGES as STAGES
from tests.conftest import write_params


def _manifest_times(root: Path) -> dict[str, str]:
    return {
        stage.name: json.loads((root / stage.name / "manifest.json").read_text())["ended_at"] for stage in STAGES
    }


def test_pipeline_caches_unchanged_stages_and_reruns_changed_ones(prefect_api, tmp_path: Path) -> None:
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline

    params_file = write_params(tmp_path / "params.yaml", str(tmp_path / "artifacts"))
    first = pipeline(params_file=str(params_file))
    assert not any(info["cached"] for info in first.values())
    built = _manifest_times(tmp_path / "artifacts")
    manifest = json.loads((tmp_path / "artifacts/pretrain/manifest.json").read_text())
    assert manifest["flow_run_id"]  # provenance links back to the Prefect flow run

    second = pipeline(params_file=str(params_file))
    assert all(info["cached"] for info in second.values()), second
    assert _manifest_times(tmp_path / "artifacts") == built  # no component ran
    assert {k: v["content_hash"] for k, v in second.items()} == {k: v["content_hash"] for k, v in first.items()}

    # change one parameter: only its stage (report, the last) reruns
    changed = write_params(tmp_path / "changed.yaml", str(tmp_path / "artifacts"), report={"title": "retitled"})
    third = pipeline(params=load_params(changed))
    assert [name for name, info in third.items() if not info["cached"]] == ["report"]

    # a deleted output is rebuilt even though Prefect's cache remembers the key
    import shutil

    shutil.rmtree(tmp_path / "artifacts/evaluate")
    fourth = pipeline(params=load_params(changed))
    assert not fourth["evaluate"]["cached"] and fourth["pretrain"]["cached"]
    assert (tmp_path / "artifacts/evaluate/manifest.json").is_file()

    import asyncio

    async def read_artifacts() -> dict:
        async with get_client() as client:
            found = await client.read_artifacts()
            return {a.key: a for a in found if a.key}

    artifacts = asyncio.run(read_artifacts())
    assert {"pipeline-stages", "pipeline-metrics", "report-report", "estimate-report",
            "curate-removed-by-reason", "curate-shards", "pretrain-report", "sft-report"} <= artifacts.keys()
    assert "held-out perplexity" in artifacts["report-report"].data
    assert "| final_loss |" in artifacts["sft-report"].data

    async def progress_artifacts() -> list:
        async with get_client() as client:
            return [a for a in await client.read_artifacts() if a.type == "progress"]

    finished = {a.description: a.data for a in asyncio.run(progress_artifacts())}
    assert finished.get("pretrain steps") == 100.0 and finished.get("sft steps") == 100.0  # live training progress


def test_prompt_tuning_flow_runs_each_trial_as_a_task(prefect_api, tmp_path: Path) -> None:
    from flows.pipeline import pipeline, prompt_tuning_flow

    params_file = write_params(tmp_path / "params.yaml", str(tmp_path / "artifacts"))
    pipeline(params_file=str(params_file))
    result = prompt_tuning_flow(params_file=str(params_file))
    assert not result["cached"]
    trials = sorted(p.name for p in (tmp_path / "artifacts/prompt_tuning.trials").iterdir() if not p.name.endswith(".runs"))
    assert trials == ["random-seed0", "random-seed1", "text-seed0", "text-seed1"]
    metrics = json.loads((tmp_path / "artifacts/prompt_tuning/metrics.json").read_text())
    assert {"heldout_loss_text_mean", "heldout_loss_random_std", "best_init"} <= metrics.keys()
    assert prompt_tuning_flow(params_file=str(params_file))["cached"]


def test_stage_flow_runs_one_stage_and_publishes_its_metrics(prefect_api, tmp_path: Path) -> None:
    from flows.pipeline import STAGE_FLOWS

    params_file = write_params(tmp_path / "params.yaml", str(tmp_path / "artifacts"))
    result = STAGE_FLOWS["curate"](params_file=str(params_file))
    assert result["uri"].endswith("artifacts/curate") and not result["cached"]
    with pytest.raises(Exception, match="pretrain: input not found"):
        STAGE_FLOWS["evaluate"](params_file=str(params_file))


def test_feasibility_flow_publishes_the_estimate(prefect_api, tmp_path: Path) -> None:
    import asyncio

    from prefect.client.orchestration import get_client

    from components.feasibility.estimate import FeasibilityConfig, ModelSource
    from flows.pipeline import feasibility_flow

    config = FeasibilityConfig(model=ModelSource(params=7e9), tokens=2e12, gpu="H100-SXM", num_gpus=64,
                               price_per_gpu_hour=2.0)
    result = feasibility_flow(config=config, output=str(tmp_path / "estimate"))
    assert result["training_flops"] == 6 * 7e9 * 2e12
    assert json.loads((tmp_path / "estimate/estimate.json").read_text())["gpu_hours"] == result["gpu_hours"]

    async def latest_markdown() -> str:
        async with get_client() as client:
            found = [a for a in await client.read_artifacts() if a.key == "feasibility-estimate"]
            return found[-1].data

    assert "| GPU-hours |" in asyncio.run(latest_markdown())


@pytest.mark.slow
def test_curation_fans_out_over_a_dask_cluster_with_the_same_result(prefect_api, tmp_path: Path) -> None:
    """Shards run as tasks on a local Dask cluster (prefect-dask) and give the bytes the
    sequential CLI path gives."""
    pytest.importorskip("prefect_dask")
    from components.artifacts import read_manifest
    from flows.pipeline import run_flow
    from flows.stages import STAGES_BY_NAME, run_stage

    threads = load_params(write_params(tmp_path / "seq.yaml", str(tmp_path / "sequential")))
    run_stage(STAGES_BY_NAME["curate"], threads)
    dask = load_params(write_params(tmp_path / "dask.yaml", str(tmp_path / "dask"),
                                    task_runner={"kind": "dask", "max_workers": 2}))
    result = run_flow("curate", dask)
    assert not result["cached"]
    shard_runs = json.loads((tmp_path / "dask/curate/manifest.json").read_text())["metrics"]["per_shard"]
    assert len(shard_runs) == 2
    assert read_manifest(str(tmp_path / "dask/curate")).output.content_hash == \
        read_manifest(str(tmp_path / "sequential/curate")).output.content_hash
