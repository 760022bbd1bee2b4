"""Prefect flows, made from the stage table (`flows.stages`): one flow per stage, and the
composite flows `pipeline` (the whole chain) and `rl_studies` over the stages that name them.

Flows hold no ML logic. Each stage is one Prefect task that calls its component; the task's
cache key is the component's own cache key (name + version + config hash + input content
hashes, see `components.artifacts.cache_key`) plus the output location, so an unchanged
re-run returns every stage from cache without touching a component. Prefect's cache only
saves the look-up: it is trusted while the output location holds the artifact that key
describes with verified bytes, else the task is refreshed. A task that does run still
reuses such an artifact (`produce`'s run cache, shared with the CLI and DVC), so a new
server with no cached results rebuilds nothing that is published. Downstream stages get
the manifest that is on disk when the task returns, never one remembered from before.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

from prefect import flow, task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from components.artifacts import (
    ArtifactRef, Manifest, cache_key, input_origins, input_ref, materialize, orchestrator_run_id, reusable,
    stage_rerun, try_read_manifest,
)
from components.config import StrictConfig
from components.errors import ArtifactError
from components.feasibility.estimate import FeasibilityConfig, estimate, read_estimate, render_markdown, run_estimate
from flows.params import DEFAULT_PARAMS_FILE, PipelineParams, TaskRunnerConfig, load_params
from components.runlog import step_observer
from flows.stages import COMPONENT_ENTRIES, COMPOSITES, STAGES, Composite, Stage, flow_name, members


def _task_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    spec, _ = COMPONENT_ENTRIES[parameters["component"]]
    key = cache_key(spec, parameters["config"], parameters["inputs"])
    dest_digest = hashlib.sha256(parameters["dest"].encode()).hexdigest()[:16]
    return f"{spec.name}-v{spec.version}-{key}-{dest_digest}"


class TrainingProgress:
    """Shows a trainer's steps in Prefect: a progress artifact and a log line every ~5 % of steps."""

    def __init__(self) -> None:
        self.artifact_id: Any = None
        self.shown = -1

    def __call__(self, trainer: str, record: dict[str, Any], max_steps: int) -> None:
        from prefect import get_run_logger
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        percent = int(100 * record["step"] / max_steps)
        if percent // 5 == self.shown // 5 and record["step"] != max_steps:
            return
        self.shown = percent
        if self.artifact_id is None:
            self.artifact_id = create_progress_artifact(progress=percent, description=f"{trainer} steps")
        else:
            update_progress_artifact(self.artifact_id, progress=percent)
        shown = [f"{name} {record[name]:.4g}" for name in (
            "loss", "learning_rate", "grad_norm", "tokens_per_s", "reward_mean", "kl", "rollout_time_s", "update_time_s",
            "pairwise_accuracy", "reward_accuracy") if isinstance(record.get(name), (int, float))]
        get_run_logger().info("%s step %d/%d %s", trainer, record["step"], max_steps, " ".join(shown))


def run_component(component: str, config: StrictConfig, inputs: dict[str, ArtifactRef], dest: str, overwrite: bool,
                  flow_run_id: str | None) -> Manifest:
    """One component run of a flow, under the drivers' one overwrite policy (`stage_rerun`, as
    `crucible STAGE`): its own previous artifact at `dest` is replaced, another component's only
    with `overwrite`, a folder without a manifest never. A flow reads the params file's layout,
    so every input is recorded as a default."""
    _, entry = COMPONENT_ENTRIES[component]
    token = orchestrator_run_id.set(flow_run_id)
    observer = step_observer.set(TrainingProgress())
    rerun, origins = stage_rerun.set(True), input_origins.set({name: "default" for name in inputs})
    try:
        return entry(config, dest=dest, overwrite=overwrite, **{k: ref.uri for k, ref in inputs.items()})
    finally:
        input_origins.reset(origins)
        stage_rerun.reset(rerun)
        step_observer.reset(observer)
        orchestrator_run_id.reset(token)


@task(cache_key_fn=_task_cache_key, persist_result=True)
def component_task(
    component: str, config: StrictConfig, inputs: dict[str, ArtifactRef], dest: str, overwrite: bool
) -> Manifest:
    # The body stays a call to a module-level function: Dask ships tasks with cloudpickle,
    # which pickles this function by value (its name is bound to the Task object).
    return run_component(component, config, inputs, dest, overwrite, flow_run.get_id())


class Submitted(NamedTuple):
    """A component run handed to the task runner, and what its output location held before."""

    future: PrefectFuture
    dest: str
    key: str
    reused: Manifest | None  # the verified artifact `key` describes, already at `dest`


def _submit(component: str, task_name: str, config: StrictConfig, inputs: dict[str, ArtifactRef], dest: str,
            overwrite: bool) -> Submitted:
    """Submit one component run to the flow's task runner. Prefect's cache is trusted only
    while `dest` holds the artifact the key describes, with verified bytes; otherwise the
    task is refreshed (and its component rebuilds or reuses what is there)."""
    spec, _ = COMPONENT_ENTRIES[component]
    key = cache_key(spec, config, inputs)
    current = reusable(dest, key)
    future = component_task.with_options(name=task_name, refresh_cache=current is None).submit(
        component, config, inputs, dest, overwrite)
    return Submitted(future, dest, key, current)


def _resolve(submitted: Submitted) -> tuple[Manifest, bool]:
    """The manifest now at the task's output location, and whether no component ran for it.

    The manifest on disk is the truth, not the task's (possibly cached) return value: a
    driver (DVC, the CLI) may have rebuilt the output with the same key since Prefect cached
    its result. One with another key means another run replaced it meanwhile: refused."""
    submitted.future.result()  # the task's failure, if any, is raised here
    on_disk = try_read_manifest(submitted.dest)
    if on_disk is None or on_disk.cache_key != submitted.key:
        found = "nothing" if on_disk is None else f"cache key {on_disk.cache_key[:12]}"
        raise ArtifactError(f"{submitted.dest}: holds {found} after its task returned, not the artifact of cache key "
                            f"{submitted.key[:12]}; another run replaced it meanwhile, run the flow again")
    return on_disk, on_disk == submitted.reused


def submit_stage(
    stage: Stage, params: PipelineParams, upstream: dict[str, Manifest], overwrite: bool = False
) -> tuple[Manifest, bool]:
    """Run one stage as tasks; returns its manifest (the one on disk) and whether it came from
    cache, i.e. no component ran for it or any of its parts.

    A fanned-out stage (curation shards, prompt-tuning trials) runs its parts as tasks on the
    task runner, then merges."""
    defaults = stage.input_uris(params)
    inputs = {
        keyword: upstream[source].output if source in upstream else input_ref(defaults[keyword])
        for keyword, source in stage.inputs.items()
    }
    dest, config = stage.dest(params), stage.config(params)
    fan_out = stage.fan_out
    if fan_out is None:
        return _resolve(_submit(stage.spec.name, stage.name, config, inputs, dest, overwrite))
    part_inputs = {name: ref for name, ref in inputs.items() if name in fan_out.part_inputs}
    plan = fan_out.plan(config, inputs, dest)
    parts = [_resolve(future) for future in [
        _submit(fan_out.part.name, f"{stage.name}-{name}", part_config, part_inputs, part_dest, overwrite)
        for name, part_config, part_dest in plan]]
    merge_inputs = {**{name: ref for name, ref in inputs.items() if name in fan_out.merge_inputs},
                    **{name: manifest.output for (name, _, _), (manifest, _) in zip(plan, parts)}}
    manifest, cached = _resolve(_submit(fan_out.merge.name, stage.name, config, merge_inputs, dest, overwrite))
    return manifest, cached and all(part_cached for _, part_cached in parts)


def _metrics_rows(manifest: Manifest) -> list[dict[str, Any]]:
    return [{"metric": name, "value": value} for name, value in manifest.metrics.items()]


def publish_stage_artifacts(stage: Stage, manifest: Manifest, cached: bool) -> None:
    """A table of the stage's metrics and, where the stage writes one, its markdown report."""
    key = flow_name(stage.name)
    create_table_artifact(
        key=f"{key}-metrics", table=_metrics_rows(manifest),
        description=f"{stage.name} -> {manifest.output.uri} ({'cached' if cached else 'built'})",
    )
    if stage.markdown_file:
        markdown = (materialize(manifest.output) / stage.markdown_file).read_text(encoding="utf-8")
        create_markdown_artifact(key=f"{key}-report", markdown=markdown)
    if stage.tables_file:
        tables = json.loads((materialize(manifest.output) / stage.tables_file).read_text(encoding="utf-8"))
        for name, rows in tables.items():
            create_table_artifact(key=f"{key}-{name}", table=rows)


def _flow_params(params_file: str, params: PipelineParams | None) -> PipelineParams:
    return params if params is not None else load_params(params_file)


def make_stage_flow(stage: Stage):
    """A flow running a single stage on the artifacts its upstream stages already published."""

    @flow(name=flow_name(stage.name), description=stage.help, validate_parameters=True)
    def stage_flow(params_file: str = stage.params_file, params: PipelineParams | None = None) -> dict[str, Any]:
        manifest, cached = submit_stage(stage, _flow_params(params_file, params), upstream={})
        publish_stage_artifacts(stage, manifest, cached)
        return {"uri": manifest.output.uri, "content_hash": manifest.output.content_hash, "cached": cached}

    return stage_flow


def _run_stages(stages: tuple[Stage, ...], params: PipelineParams, table_key: str) -> tuple[dict[str, Manifest], dict[str, Any]]:
    """Stages in order, each on its upstream's manifests (or the published artifacts of stages not run here)."""
    upstream: dict[str, Manifest] = {}
    summary: dict[str, Any] = {}
    for stage in stages:
        manifest, cached = submit_stage(stage, params, upstream)
        if stage.markdown_file or stage.tables_file:
            publish_stage_artifacts(stage, manifest, cached)
        upstream[stage.name] = manifest
        summary[stage.name] = {
            "uri": manifest.output.uri, "content_hash": manifest.output.content_hash, "cached": cached,
        }
    create_table_artifact(key=table_key, table=[{"stage": name, **info} for name, info in summary.items()],
                          description="Each stage's artifact and whether it came from cache.")
    return upstream, summary


def make_composite_flow(composite: Composite):
    """A flow running the stages that name `composite` in the table, in table order."""
    stages, key = members(composite.name), flow_name(composite.name)

    @flow(name=key, description=f"{composite.description}: {' -> '.join(stage.name for stage in stages)}.")
    def composite_flow(params_file: str = composite.params_file, params: PipelineParams | None = None) -> dict[str, Any]:
        upstream, summary = _run_stages(stages, _flow_params(params_file, params), f"{key}-stages")
        if composite.report_stage:
            create_table_artifact(key=f"{key}-metrics", table=_metrics_rows(upstream[composite.report_stage]))
        return summary

    return composite_flow


STAGE_FLOWS = {stage.name: make_stage_flow(stage) for stage in STAGES}
FLOWS = {**{composite.name: make_composite_flow(composite) for composite in COMPOSITES}, **STAGE_FLOWS}


@task(name="estimate")
def estimate_task(config: FeasibilityConfig, output: str | None) -> dict[str, Any]:
    if output is None:
        return estimate(config)
    token = stage_rerun.set(True)  # the same overwrite policy as every stage
    try:
        return read_estimate(run_estimate(config, output))
    finally:
        stage_rerun.reset(token)


@flow(name="feasibility", description="Estimate FLOPs, memory, time, cost and a DeepSpeed plan for any run.")
def feasibility_flow(config: FeasibilityConfig, output: str | None = None) -> dict[str, Any]:
    """The estimator on its own (what `crucible estimate` computes), with a Prefect report;
    `output` also publishes it as an artifact."""
    result = estimate_task(config, output)
    create_markdown_artifact(key="feasibility-estimate", markdown=render_markdown(result))
    return result


# Module-level names: each composite by its name (`pipeline`, `rl_studies`), each stage as
# `<stage>_flow`, and `feasibility_flow`; deployments name them through flows/entrypoints.py.
ENTRYPOINT_FLOWS = {**{composite.name: FLOWS[composite.name] for composite in COMPOSITES},
                    **{stage.flow_attribute: STAGE_FLOWS[stage.name] for stage in STAGES},
                    "feasibility_flow": feasibility_flow}
globals().update(ENTRYPOINT_FLOWS)


def make_task_runner(config: TaskRunnerConfig) -> TaskRunner:
    """Prefect's thread pool, Dask (a running scheduler, else a LocalCluster of processes) or
    Ray (a running cluster, else a local one)."""
    if config.kind == "ray":
        from prefect_ray import RayTaskRunner

        if config.ray_address:
            return RayTaskRunner(address=config.ray_address)
        return RayTaskRunner(init_kwargs={"num_cpus": config.max_workers or 2, "include_dashboard": False})
    if config.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if config.dask_address:
            return DaskTaskRunner(address=config.dask_address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": config.max_workers or 2, "threads_per_worker": 1,
                                              "processes": True})
    return ThreadPoolTaskRunner(max_workers=config.max_workers)


def run_flow(name: str, params: PipelineParams, params_file: str = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Run a flow on the task runner `params.task_runner` describes."""
    return FLOWS[name].with_options(task_runner=make_task_runner(params.task_runner))(params_file=params_file, params=params)
