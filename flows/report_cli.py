"""`crucible report EVAL_ARTIFACT`: an evaluation's report and the lineage of the model it scored,
instead of running the report stage."""

from __future__ import annotations

import argparse

from components.artifacts import lineage_lines, materialize, read_manifest
from components.errors import ArtifactError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifact", nargs="?", metavar="EVAL_ARTIFACT",
                        help="Print this evaluation artifact's report and the lineage of the model it "
                             "evaluated, instead of running the report stage.")


def names_artifact(args: argparse.Namespace) -> bool:
    return bool(args.artifact)


def evaluation_report(uri: str) -> str:
    """An evaluation artifact's markdown report, then the lineage of the model it scored."""
    manifest = read_manifest(uri)
    directory = materialize(manifest.output.model_copy(update={"uri": uri}))
    reports = sorted(directory.glob("*.md"))
    if not reports:
        raise ArtifactError(f"{uri}: no markdown report in this artifact ({manifest.component.name})")
    text = reports[0].read_text(encoding="utf-8")
    model = manifest.inputs.get("model")
    if model is not None:
        text += "\n## Lineage of the evaluated model\n\n```\n" + "\n".join(lineage_lines(model.uri)) + "\n```\n"
    return text


def print_report(args: argparse.Namespace) -> None:
    print(evaluation_report(args.artifact))
