"""Prefect flows on a real (temporary) Prefect API: caching, artifacts, per-stage flows."""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
from pathlib import Path

import pytest

from flows.params import load_params
from flows.stages import PIPELINE_STAGES as STAGES
from tests.conftest import VENV_BIN, write_params


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


def _tree(root: Path) -> dict[str, str]:
    """Every file under `root` (artifacts, shards, training run directories) with its sha256."""
    from components.artifacts import file_sha256

    return {p.relative_to(root).as_posix(): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _stage_keys(root: Path) -> set[str]:
    return {json.loads((root / stage.name / "manifest.json").read_text())["cache_key"] for stage in STAGES}


def _assert_inputs_are_what_is_on_disk(root: Path) -> None:
    """Every stage was built from the artifacts now published upstream of it (no stale manifest)."""
    from components.artifacts import read_manifest

    for stage in STAGES:
        for name, ref in read_manifest(str(root / stage.name)).inputs.items():
            if ref.kind == "artifact":
                assert read_manifest(ref.uri).output.content_hash == ref.content_hash, (stage.name, name)


def _crucible_on_a_new_prefect_home(home: Path, *args: str) -> str:
    """`crucible ARGS` as on a newly set-up machine: its own PREFECT_HOME (database and result
    storage) and its own temporary API, so Prefect has no task result cached anywhere."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API", "PREFECT_LOCAL_STORAGE"))}
    result = subprocess.run([str(VENV_BIN / "crucible"), *args], env={**env, "PREFECT_HOME": str(home)},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


def test_a_flow_on_a_new_prefect_home_reuses_what_the_cli_and_dvc_published(prefect_api, tmp_path: Path) -> None:
    """`make demo` (`crucible run pipeline`) or `dvc repro` (`crucible STAGE` per stage), then the
    pipeline on a new Prefect home with no cached task result: every stage is reused from the
    verified artifact on disk, its task runs but its component does not."""
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    from flows.cli import main
    from flows.pipeline import pipeline

    demo = write_params(tmp_path / "demo.yaml", str(tmp_path / "demo"))
    assert main(["run", "pipeline", "--config", str(demo)]) == 0  # `make demo`
    published = _tree(tmp_path / "demo")
    home = tmp_path / "new-home"
    output = _crucible_on_a_new_prefect_home(home, "run", "pipeline", "--config", str(demo))
    assert f"pipeline: {len(STAGES)} stages, {len(STAGES)} from cache" in output
    assert _tree(tmp_path / "demo") == published  # no component ran: every manifest and byte as it was
    stored = [record.name for record in (home / "storage").iterdir()]  # each task ran and stored its result
    assert all(any(key in name for name in stored) for key in _stage_keys(tmp_path / "demo"))

    # `crucible pretrain --rebuild` republishes pretrain under the same key; Prefect's cache on the
    # first home still returns the old manifest, yet downstream stages must see the one on disk.
    before = json.loads((tmp_path / "demo/pretrain/manifest.json").read_text())
    assert main(["pretrain", "--config", str(demo), "--rebuild"]) == 0
    rebuilt = json.loads((tmp_path / "demo/pretrain/manifest.json").read_text())
    assert rebuilt["cache_key"] == before["cache_key"] and rebuilt["started_at"] > before["ended_at"]
    assert rebuilt["output"]["content_hash"] != before["output"]["content_hash"]  # its report holds timings
    rerun = pipeline(params_file=str(demo))
    assert rerun["pretrain"] == {"uri": rebuilt["output"]["uri"], "content_hash": rebuilt["output"]["content_hash"],
                                 "cached": True}
    assert not rerun["evaluate"]["cached"] and rerun["tokenizer"]["cached"]
    _assert_inputs_are_what_is_on_disk(tmp_path / "demo")

    direct = write_params(tmp_path / "direct.yaml", str(tmp_path / "direct"))
    for stage in STAGES:  # what `dvc repro` runs
        assert main([stage.name, "--config", str(direct)]) == 0
    published = _tree(tmp_path / "direct")
    with temporary_settings({PREFECT_LOCAL_STORAGE_PATH: tmp_path / "empty-results"}):
        result = pipeline(params_file=str(direct))
    assert all(info["cached"] for info in result.values()), result
    assert _tree(tmp_path / "direct") == published
    stored = [record.name for record in (tmp_path / "empty-results").iterdir()]
    assert all(any(key in name for name in stored) for key in _stage_keys(tmp_path / "direct"))


def _names_written_by_hand(path: Path, names: set[str]) -> list[str]:
    """Where a module spells out a stage or composite: a string literal naming one (a keyword
    argument such as a task's `name=` aside), or a module-level binding of a flow's name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    keyword_values = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.keyword)}
    literals = [f"{path.name}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                if isinstance(node, ast.Constant) and node.value in names and id(node) not in keyword_values]
    targets = [(node.lineno, target) for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
               for target in (node.targets if isinstance(node, ast.Assign) else [node.target])]
    bindings = [f"{path.name}:{line} {target.id} =" for line, target in targets
                if isinstance(target, ast.Name) and target.id in names]
    return literals + bindings


def test_flows_and_commands_come_from_the_stage_table() -> None:
    """Every stage of STAGES has a flow (bound at module level, for deployments' entrypoints) and a
    `crucible` command; the only other flows are the composites that the table's stages name; and
    neither flows/pipeline.py nor flows/cli.py lists a stage or composite by hand beside the table."""
    import flows.pipeline as pipeline_module
    from flows import stages as table
    from flows.cli import _build_parser

    composites = [composite.name for composite in table.COMPOSITES]
    stage_names = [stage.name for stage in table.STAGES]
    assert set(composites) == {stage.composite for stage in table.STAGES} - {None} == {"pipeline", "rl_studies", "real", "agents"}
    assert set(pipeline_module.FLOWS) == {*composites, *stage_names}
    for name in composites:
        assert table.members(name) and getattr(pipeline_module, name) is pipeline_module.FLOWS[name]
        assert pipeline_module.FLOWS[name].name == table.flow_name(name)
    for stage in table.STAGES:
        assert getattr(pipeline_module, stage.flow_attribute) is pipeline_module.FLOWS[stage.name]
        assert pipeline_module.FLOWS[stage.name].name == table.flow_name(stage.name)
        assert all(table.COMPONENT_ENTRIES[spec.name] == (spec, entry) for spec, entry in stage.task_components())

    parser = _build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    assert list(commands) == ["run", "lineage", "stack", "agent", *stage_names]
    flow_argument = next(action for action in commands["run"]._actions if action.dest == "flow")
    assert list(flow_argument.choices) == [*composites, *stage_names]

    names = {*composites, *stage_names, *(stage.flow_attribute for stage in table.STAGES)}
    written = [*_names_written_by_hand(Path(pipeline_module.__file__), names),
               *_names_written_by_hand(Path(pipeline_module.__file__).with_name("cli.py"), names)]
    assert not written, f"derive these from flows.stages.STAGES instead: {written}"
