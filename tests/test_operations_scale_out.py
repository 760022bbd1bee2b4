"""Scale-out: a DeepSpeed hostfile written by a Prefect task (parsed by DeepSpeed's own runner,
passed to the launcher), and curation shards fanned out over a local Ray cluster (prefect-ray)
with the bytes the sequential path gives. Two CPU ranks under the launcher are tested in
tests/test_training_loop.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import ConfigError
from tests.conftest import write_params


def test_the_hostfile_task_writes_what_deepspeed_reads_and_the_launcher_passes_it(prefect_api, tmp_path: Path) -> None:
    from deepspeed.launcher.runner import fetch_hostfile
    from prefect import flow

    from components.train.config import DistributedConfig
    from components.train.launch import deepspeed_command
    from flows.scale_out import deepspeed_hostfile

    @flow
    def plan_hosts(path: str) -> str:
        return deepspeed_hostfile(path, slots_per_host=2, hosts=["localhost", "node-1.cluster.local"])

    path = plan_hosts(str(tmp_path / "cluster" / "hostfile"))
    assert Path(path).read_text() == "localhost slots=2\nnode-1.cluster.local slots=2\n"
    assert dict(fetch_hostfile(path)) == {"localhost": 2, "node-1.cluster.local": 2}  # DeepSpeed's parser
    assert [p.name for p in Path(path).parent.iterdir()] == ["hostfile"]  # no staging file left

    command = deepspeed_command(DistributedConfig(launcher="deepspeed", hostfile=path), 2, tmp_path / "job.json")
    assert command[command.index("--hostfile") + 1] == path and "--master_addr" not in command


@pytest.mark.parametrize("hosts, slots, message", [
    (["localhost"], 0, "slots_per_host: must be at least 1"),
    ([], 2, "at least one host"),
    (["node 1"], 2, "'node 1' is not a host name"),
    (["a", "a"], 2, r"listed more than once: \['a'\]"),
])
def test_a_bad_hostfile_request_is_named(hosts: list[str], slots: int, message: str, tmp_path: Path) -> None:
    from flows.scale_out import deepspeed_hostfile

    with pytest.raises(ConfigError, match=message):
        deepspeed_hostfile.fn(str(tmp_path / "hostfile"), slots, hosts)
    assert not (tmp_path / "hostfile").exists()


@pytest.mark.slow
def test_curation_fans_out_over_a_local_ray_cluster_with_the_same_result(prefect_api, tmp_path: Path) -> None:
    """Shards run as Ray tasks (prefect-ray, a local Ray instance of two CPUs) and give the
    bytes the sequential CLI path gives."""
    pytest.importorskip("prefect_ray")
    from prefect_ray import RayTaskRunner

    from components.artifacts import read_manifest
    from flows.params import load_params
    from flows.pipeline import curate_flow
    from flows.stages import STAGES_BY_NAME, run_stage

    run_stage(STAGES_BY_NAME["curate"], load_params(write_params(tmp_path / "seq.yaml", str(tmp_path / "sequential"))))
    ray_params = write_params(tmp_path / "ray.yaml", str(tmp_path / "ray"))
    runner = RayTaskRunner(init_kwargs={"num_cpus": 2, "include_dashboard": False, "log_to_driver": False})
    result = curate_flow.with_options(task_runner=runner)(params_file=str(ray_params))
    assert not result["cached"]
    manifest = read_manifest(str(tmp_path / "ray/curate"))
    assert len(manifest.metrics["per_shard"]) == 2
    assert manifest.output.content_hash == read_manifest(str(tmp_path / "sequential/curate")).output.content_hash
