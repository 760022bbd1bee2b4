"""`crucible`: run flows, run single stages (what DVC calls), and walk lineage."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from components.artifacts import input_ref, lineage_lines, materialize, rebuilding
from components.errors import CrucibleError
from flows import agent_cli
from flows.params import DEFAULT_PARAMS_FILE, load_params
from flows.stages import COMPOSITES, COMPOSITES_BY_NAME, STAGES, STAGES_BY_NAME, Stage, default_params_file, run_stage

PREFECT_DEFAULTS = {
    # The temporary local API can take a while to start on a small machine.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="crucible",
        description="Curate data, train and evaluate language models; one code path for the CLI, Prefect and DVC.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    composites = ", ".join(f"'{composite.name}'" for composite in COMPOSITES)
    run = commands.add_parser("run", help=f"Run a Prefect flow: {composites} or one stage.",
                              description="Run a Prefect flow on the local (or configured) Prefect API.")
    run.add_argument("flow", choices=[*COMPOSITES_BY_NAME, *STAGES_BY_NAME], help="Flow to run.")
    run.add_argument("--config", default=None, help=f"Params file (default: the flow's own, {DEFAULT_PARAMS_FILE}; "
                                                     "real/params.yaml for `real` and its stages).")

    lineage = commands.add_parser("lineage", help="Print an artifact's chain back to the raw data.",
                                  description="Walk manifests from an artifact back to its raw inputs.")
    lineage.add_argument("uri", help="Artifact directory or URI (e.g. artifacts/report, s3://bucket/run/report).")

    stack = commands.add_parser("stack", help="Start or stop a local Prefect server and process worker.",
                                description="A Prefect server (SQLite, 127.0.0.1) and a process worker on the "
                                            "'crucible' work pool; pids and logs under --state-dir.")
    stack.add_argument("action", choices=["up", "down", "status"],
                       help="up: start (or restart a dead worker); down: stop both; status: pids, URL, logs.")
    stack.add_argument("--state-dir", default=None, help="Pids, logs, database (default: ~/.cache/crucible/stack).")
    stack.add_argument("--host", default="127.0.0.1", help="Server address (default: %(default)s; another "
                                                           "address needs PREFECT_SERVER_API_AUTH_STRING).")
    stack.add_argument("--port", type=int, default=4200, help="Server port, 0 for a free one (default: %(default)s).")
    stack.add_argument("--pool", default="crucible", help="Process work pool (default: %(default)s).")
    stack.add_argument("--deploy", action="store_true", help="Also deploy every flow of infra/prefect.yaml.")

    agent = commands.add_parser("agent", help="Run a model as an agent on an environment's task (`agent run`).",
                                description="Agents: tools, memory and reflection over the environments.")
    agent_cli.add_arguments(agent)

    for stage in STAGES:
        _add_stage_command(commands, stage)
    return parser


def _add_stage_command(commands: argparse._SubParsersAction, stage: Stage) -> None:
    """`crucible STAGE`: run one stage (what DVC calls), or the other mode its table entry declares."""
    variant = stage.cli
    help_text = stage.help.replace("%", "%%")  # argparse %-formats help strings ("95 % interval")
    if variant is not None and variant.description:
        sub = commands.add_parser(stage.name, help=help_text, description=variant.description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        sub = commands.add_parser(stage.name, help=help_text, description=stage.help)
    if variant is not None:
        variant.add_arguments(sub)
    sub.add_argument("--config", default=stage.params_file, help="Params file (default: %(default)s).")
    for keyword, source in stage.inputs.items():
        sub.add_argument(f"--{keyword}", metavar="URI",
                         help=f"Input '{keyword}' (default when no input is named: the params file's "
                              f"layout, '{source}').")
    sub.add_argument("--layout-defaults", action="store_true",
                     help="Once you name an input, take the inputs you do not name from the params "
                          "file's layout on purpose (else they must follow from yours or be named).")
    sub.add_argument("--output", metavar="URI", help="Output artifact (default: ARTIFACTS_ROOT/%s)." % stage.name)
    sub.add_argument("--overwrite", action="store_true",
                     help="Replace an output that holds another component's artifact (or this one with "
                          "corrupt bytes). This stage's previous artifact there is replaced without it; a "
                          "folder that is no artifact never is. An up-to-date, verified artifact is reused.")
    sub.add_argument("--rebuild", action="store_true",
                     help="Run the component even when the output is up to date, and replace it.")
    if variant is not None:
        sub.set_defaults(**variant.defaults)


def _run_flow(name: str, config_path: str) -> None:
    params = load_params(config_path)  # fail before any Prefect or component work starts
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)
    from flows.pipeline import run_flow

    result = run_flow(name, params, config_path)
    composite = COMPOSITES_BY_NAME.get(name)
    if composite is None:
        print(f"{name}: {result['uri']} ({'cached' if result['cached'] else 'built'})")
    elif composite.report_stage:
        report = STAGES_BY_NAME[composite.report_stage]
        report_dir = materialize(input_ref(result[report.name]["uri"]))
        print((report_dir / report.markdown_file).read_text(encoding="utf-8"))
        cached = sum(info["cached"] for info in result.values())
        print(f"{name}: {len(result)} stages, {cached} from cache")
    else:
        for stage, info in result.items():
            print(f"{stage}: {info['uri']} ({'cached' if info['cached'] else 'built'})")


def _stack(args: argparse.Namespace) -> None:
    from flows import stack

    state_dir = Path(args.state_dir) if args.state_dir else stack.DEFAULT_STATE_DIR
    if args.action == "up":
        state = stack.up(state_dir, host=args.host, port=args.port, pool=args.pool, deploy=args.deploy)
        print(stack.status(state_dir))
        print(f"export PREFECT_API_URL={state.api_url}")
    elif args.action == "down":
        print("stopped" if stack.down(state_dir) else f"no stack in {state_dir}")
    else:
        print(stack.status(state_dir))


def _dispatch(args: argparse.Namespace) -> None:
    if args.command == "run":
        _run_flow(args.flow, args.config or default_params_file(args.flow))
    elif args.command == "stack":
        _stack(args)
    elif args.command == "agent":
        agent_cli.run(args)
    elif args.command == "lineage":
        print("\n".join(lineage_lines(args.uri)))
    else:
        stage = STAGES_BY_NAME[args.command]
        if stage.cli is not None and stage.cli.selected(args):
            stage.cli.run(args)
        else:
            _run_stage(stage, args)


def _run_stage(stage: Stage, args: argparse.Namespace) -> None:
    params = load_params(args.config or stage.params_file)
    overrides = {k: getattr(args, k) for k in stage.inputs if getattr(args, k) is not None}
    manifest = run_stage(stage, params, overrides, dest=args.output, overwrite=args.overwrite,
                         layout_defaults=args.layout_defaults)
    print(f"{stage.name}: {manifest.output.uri} {manifest.output.content_hash[:19]}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for ours in ("components", "flows"):
        logging.getLogger(ours).setLevel(logging.INFO)
    try:
        with rebuilding() if getattr(args, "rebuild", False) else contextlib.nullcontext():
            _dispatch(args)
    except CrucibleError as error:
        print(f"crucible: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
