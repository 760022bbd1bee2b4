"""Prefect's entrypoints: infra/prefect.yaml names every flow as `flows/entrypoints.py:<name>`
(`pipeline`, `rl_studies`, `feasibility_flow`, and `<stage>_flow` for each stage).

Prefect executes an entrypoint's file afresh each time it loads a flow from it: `prefect
deploy --all` once per deployment. Building the flows makes each one's parameter schema from
PipelineParams (about 7 s for all of them), so they are built once, in `flows.pipeline`, an
ordinary import kept in sys.modules, and this file only binds their names."""

from flows.pipeline import ENTRYPOINT_FLOWS

globals().update(ENTRYPOINT_FLOWS)
