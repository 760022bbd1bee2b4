"""Deployments on a real Prefect server: `crucible stack up --deploy` (a server with basic auth on
127.0.0.1, SQLite in a temporary directory, a process worker) deploys every flow of
infra/prefect.yaml; runs go through the worker; the nightly cron makes scheduled runs; bad
parameters are refused with the validation message; unauthenticated clients are refused."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO_ROOT, VENV_BIN, write_params

pytestmark = pytest.mark.slow

PREFECT_FILE = REPO_ROOT / "infra" / "prefect.yaml"
AUTOMATIONS_FILE = REPO_ROOT / "infra" / "automations.yaml"
K8S_TEMPLATE = REPO_ROOT / "infra" / "kubernetes" / "base-job-template.json"


@dataclass(frozen=True)
class Stack:
    api_url: str
    auth: str
    state: dict
    env: dict[str, str]


def _stack_env(state_dir: Path, auth: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_API", "PREFECT_LOCAL_STORAGE", "PREFECT_HOME", "PREFECT_PROFILES"))}
    env.update({
        "PREFECT_HOME": str(state_dir / "home"),
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # poll often, so runs start quickly
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "CRUCIBLE_CACHE_DIR": str(state_dir / "cache"),
    })
    return env


def crucible(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(VENV_BIN / "crucible"), *args], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, f"crucible {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("stack")
    auth = f"crucible:{uuid.uuid4().hex}"
    env = _stack_env(state_dir, auth)
    try:
        crucible("stack", "up", "--state-dir", str(state_dir), "--port", "0", "--deploy", env=env, timeout=900)
        state = json.loads((state_dir / "stack.json").read_text())
        yield Stack(api_url=state["api_url"], auth=auth, state=state, env=env)
    finally:
        crucible("stack", "down", "--state-dir", str(state_dir), env=env)


def client(stack: Stack):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=stack.api_url, auth_string=stack.auth)


def wait_final(stack: Stack, flow_run_id, timeout_s: float = 300):
    deadline = time.monotonic() + timeout_s
    with client(stack) as api:
        while True:
            run = api.read_flow_run(flow_run_id)
            if run.state is not None and run.state.is_final():
                return run
            assert time.monotonic() < deadline, f"flow run {flow_run_id} still {run.state.type} after {timeout_s} s"
            time.sleep(1)


def deployment_entrypoints() -> dict[str, str]:
    config = yaml.safe_load(PREFECT_FILE.read_text())
    return {d["entrypoint"]: d["name"] for d in config["deployments"]}


def test_every_flow_has_a_deployment_on_the_process_pool(stack: Stack) -> None:
    import flows.entrypoints as pipeline_module
    from flows.pipeline import FLOWS

    entrypoints = deployment_entrypoints()
    # every entrypoint is a module-level flow the worker can load, and every flow has one
    deployed = {getattr(pipeline_module, entrypoint.split(":")[1]) for entrypoint in entrypoints}
    everything = {*FLOWS.values(), pipeline_module.feasibility_flow}
    missing = sorted(name for name, flow in FLOWS.items() if flow not in deployed)
    assert not missing, f"flows with no deployment in infra/prefect.yaml (give each a module-level name): {missing}"
    assert deployed == everything and len(entrypoints) == len(everything)
    expected = set(entrypoints)
    # each deployment reads the params file its flow's command reads (the real chain: real/params.yaml)
    from flows.stages import default_params_file

    for d in yaml.safe_load(PREFECT_FILE.read_text())["deployments"]:
        flow = getattr(pipeline_module, d["entrypoint"].split(":")[1])
        if flow is not pipeline_module.feasibility_flow:
            assert d["parameters"]["params_file"] == default_params_file(flow.name.replace("-", "_")), d["entrypoint"]

    with client(stack) as api:
        deployed = api.read_deployments()
        assert {d.entrypoint for d in deployed} == expected
        assert {d.work_pool_name for d in deployed} == {"crucible"}
        assert all(d.enforce_parameter_schema for d in deployed)
        assert api.read_work_pool("crucible").type == "process"
        pretrain = api.read_deployment_by_name("pretrain/manual")
        # the schema the server validates against is the flows' pydantic models
        schema = json.dumps(pretrain.parameter_openapi_schema)
        assert "PipelineParams" in schema and "learning_rate" in schema


def test_the_server_binds_loopback_and_refuses_unauthenticated_clients(stack: Stack) -> None:
    import psutil

    assert stack.state["host"] == "127.0.0.1"
    server = psutil.Process(stack.state["server_pid"])
    listening = [c.laddr for p in [server, *server.children(recursive=True)]
                 for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}

    filter_url = f"{stack.api_url}/deployments/filter"
    assert httpx.post(filter_url, json={}).status_code == 401
    assert httpx.post(filter_url, json={}, auth=("crucible", "wrong")).status_code == 401
    user, password = stack.auth.split(":", 1)
    assert httpx.post(filter_url, json={}, auth=(user, password)).status_code == 200
    assert httpx.get(f"{stack.api_url}/health").status_code == 200  # probes need no credentials

    unauthenticated = subprocess.run(
        [str(VENV_BIN / "prefect"), "deployment", "ls"], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in stack.env.items() if k != "PREFECT_SERVER_API_AUTH_STRING"}
        | {"PREFECT_API_URL": stack.api_url})
    assert unauthenticated.returncode != 0 and "401" in unauthenticated.stdout + unauthenticated.stderr
    authenticated = subprocess.run(
        [str(VENV_BIN / "prefect"), "deployment", "ls"], capture_output=True, text=True, timeout=120,
        env=stack.env | {"PREFECT_API_URL": stack.api_url, "PREFECT_API_AUTH_STRING": stack.auth})
    assert authenticated.returncode == 0 and "pipeline/nightly" in authenticated.stdout


def test_serving_beyond_loopback_needs_an_auth_string(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.stack import StackError, up

    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    with pytest.raises(StackError, match="without authentication"):
        up(tmp_path / "state", host="0.0.0.0")
    assert not (tmp_path / "state").exists()


def test_the_nightly_cron_creates_scheduled_runs(stack: Stack) -> None:
    from prefect.client.schemas.filters import (
        DeploymentFilter, DeploymentFilterId, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    with client(stack) as api:
        nightly = api.read_deployment_by_name("pipeline/nightly")
        assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.schedules[0].active
        deadline = time.monotonic() + 90
        while True:
            scheduled = api.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[nightly.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                    any_=[StateType.SCHEDULED]))))
            if len(scheduled) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(2)
    starts = sorted(run.expected_start_time.astimezone(timezone.utc) for run in scheduled)
    assert len(starts) >= 2, "the scheduler made no runs for the nightly deployment"
    assert all((t.hour, t.minute) == (2, 0) for t in starts)
    assert all(b - a == timedelta(days=1) for a, b in zip(starts, starts[1:]))
    assert all(run.parameters == {"params_file": "params.yaml"} for run in scheduled)


def test_a_deployment_runs_on_the_worker_and_its_result_is_read_through_the_api(
        stack: Stack, tmp_path: Path) -> None:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.client.schemas.objects import StateType

    params_file = write_params(tmp_path / "params.yaml", str(tmp_path / "artifacts"))
    with client(stack) as api:
        deployment = api.read_deployment_by_name("arithmetic-task/manual")
        run = api.create_flow_run_from_deployment(deployment.id, parameters={"params_file": str(params_file)})
    finished = wait_final(stack, run.id)
    assert finished.state.type == StateType.COMPLETED, finished.state.message
    result = finished.state.result()  # persisted by the deployment's PREFECT_RESULTS_PERSIST_BY_DEFAULT
    assert result["uri"] == str(tmp_path / "artifacts/arithmetic_task") and not result["cached"]
    manifest = json.loads((tmp_path / "artifacts/arithmetic_task/manifest.json").read_text())
    assert manifest["flow_run_id"] == str(run.id)  # lineage points back at the deployment's run
    assert manifest["output"]["content_hash"] == result["content_hash"]
    with client(stack) as api:
        artifacts = api.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    keyed = {a.key: a for a in artifacts if a.key}
    assert set(keyed) == {"arithmetic-task-metrics"}
    assert {row["metric"] for row in json.loads(keyed["arithmetic-task-metrics"].data)} == {
        "train_problems", "test_problems", "validation_problems"}

    with client(stack) as api:  # a second run of the deployment does no work
        again = api.create_flow_run_from_deployment(deployment.id, parameters={"params_file": str(params_file)})
    assert wait_final(stack, again.id).state.result()["cached"]
    assert json.loads((tmp_path / "artifacts/arithmetic_task/manifest.json").read_text()) == manifest


def test_invalid_deployment_parameters_are_refused_with_the_validation_message(stack: Stack) -> None:
    from prefect.client.schemas.objects import StateType
    from prefect.exceptions import PrefectHTTPStatusError

    with client(stack) as api:
        feasibility = api.read_deployment_by_name("feasibility/manual")
        # what the JSON schema of the pydantic model says: refused when the run is created
        with pytest.raises(PrefectHTTPStatusError, match=r"config\.tokens.*less than or equal to the minimum of 0"):
            api.create_flow_run_from_deployment(feasibility.id, parameters={"config": {"model": {"params": 7e9},
                                                                                       "tokens": -1}})
        with pytest.raises(PrefectHTTPStatusError, match="max_step"):  # unknown keys too (extra="forbid")
            api.create_flow_run_from_deployment(
                api.read_deployment_by_name("pretrain/manual").id,
                parameters={"params": {"pretrain": {"train": {"max_step": 3}}}})
        # what only the model's validators know: the run fails before any task, with pydantic's message
        run = api.create_flow_run_from_deployment(feasibility.id, parameters={"config": {
            "model": {"params": 7e9}, "tokens": 1e12, "num_gpus": 6, "plan": {"tensor_parallel": 4}}})
    finished = wait_final(stack, run.id)
    assert finished.state.type == StateType.FAILED
    assert "--num-gpus (6) must be a positive multiple of tensor x pipeline parallel (4)" in finished.state.message


def test_the_kubernetes_job_template_makes_a_work_pool(stack: Stack) -> None:
    """The server accepts infra/kubernetes/base-job-template.json as a kubernetes pool's template
    (every placeholder a declared variable); running it needs a cluster and prefect-kubernetes."""
    subprocess.run([str(VENV_BIN / "prefect"), "work-pool", "create", "crucible-k8s", "--type", "kubernetes",
                    "--base-job-template", str(K8S_TEMPLATE)], check=True, capture_output=True, timeout=120,
                   env=stack.env | {"PREFECT_API_URL": stack.api_url, "PREFECT_API_AUTH_STRING": stack.auth})
    with client(stack) as api:
        pool = api.read_work_pool("crucible-k8s")
    assert pool.type == "kubernetes"
    assert pool.base_job_template == json.loads(K8S_TEMPLATE.read_text())
    defaults = {name: spec.get("default") for name, spec in pool.base_job_template["variables"]["properties"].items()}
    assert defaults["image"] == "crucible:latest" and defaults["gpus"] == 0


def test_a_killed_worker_leaves_a_crashed_run_and_the_rerun_redoes_only_what_was_not_published(
        stack: Stack, tmp_path: Path) -> None:
    """SIGKILL to the worker and its flow-run process (a machine gone) mid-pipeline: the
    heartbeat automation marks the run Crashed; `crucible stack up` starts a new worker; a
    rerun of the deployment finishes without rebuilding the stages already published."""
    import psutil
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import AutomationCore

    from flows.stages import PIPELINE_STAGES

    shipped = yaml.safe_load(AUTOMATIONS_FILE.read_text())["automations"][0]
    with client(stack) as api:
        assert api.read_automations_by_name(shipped["name"])  # created by `crucible stack up --deploy`
        # the same automation with a shorter wait, so this test takes 40 s, not 90 s
        api.create_automation(AutomationCore.model_validate(
            {**shipped, "name": "crash-zombie-flow-runs-test", "trigger": {**shipped["trigger"], "within": 40}}))
        nightly = api.read_deployment_by_name("pipeline/nightly")
    artifacts = tmp_path / "artifacts"
    params_file = write_params(tmp_path / "params.yaml", str(artifacts))
    with client(stack) as api:
        run = api.create_flow_run_from_deployment(nightly.id, parameters={"params_file": str(params_file)})

    deadline = time.monotonic() + 300
    while not (artifacts / "tokenizer" / "manifest.json").exists():
        assert time.monotonic() < deadline, "the pipeline never published its tokenizer"
        time.sleep(0.2)
    worker = psutil.Process(stack.state["worker_pid"])
    doomed = [worker, *worker.children(recursive=True)]
    assert len(doomed) >= 2  # the worker and the flow run it started
    for process in doomed:
        process.kill()
    psutil.wait_procs(doomed, timeout=30)
    published = {p.parent.name: json.loads(p.read_text())["ended_at"] for p in artifacts.glob("*/manifest.json")}
    assert "tokenizer" in published and "report" not in published

    crashed = wait_final(stack, run.id, timeout_s=240)
    assert crashed.state.type == StateType.CRASHED, crashed.state

    crucible("stack", "up", "--state-dir", str(Path(stack.state["server_log"]).parent), env=stack.env)
    restarted = json.loads((Path(stack.state["server_log"]).parent / "stack.json").read_text())
    assert restarted["server_pid"] == stack.state["server_pid"] and restarted["worker_pid"] != worker.pid
    with client(stack) as api:
        rerun = api.create_flow_run_from_deployment(nightly.id, parameters={"params_file": str(params_file)})
    finished = wait_final(stack, rerun.id, timeout_s=400)
    assert finished.state.type == StateType.COMPLETED, finished.state.message
    result = finished.state.result()
    assert set(result) == {stage.name for stage in PIPELINE_STAGES}
    for name, ended_at in published.items():  # published stages were not rebuilt
        assert json.loads((artifacts / name / "manifest.json").read_text())["ended_at"] == ended_at
        assert result[name]["cached"], name
    assert not any(result[name]["cached"] for name in {"report", "sft", "grpo"})
    for stage in PIPELINE_STAGES:
        assert (artifacts / stage.name / "manifest.json").is_file()
