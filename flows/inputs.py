"""Which files a single-stage run reads: what the user named, what follows from it, never the demo's.

Invariant: once a user names any input of a stage, every other input either follows from
what they named (the DPO policy from the reference's model, a report's model from the
evaluation it reports on) or is dropped where the stage has a meaning without it (the
curation selection of `sft_data`), or must be named too. Nothing silently falls back to the
params file's layout (`artifacts/<stage>`, `data.raw_*`), which on a checkout where the demo
ran holds the demo's files. `--layout-defaults` takes the layout on purpose.

With no input named, a stage reads the layout of the params file: that is the pipeline the
user configured (`dvc repro`, `crucible run`), not a fallback.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from components.artifacts import is_remote, local_path, try_read_manifest
from components.errors import ConfigError

Origin = Literal["given", "default", "derived"]


@dataclass(frozen=True)
class ResolvedInput:
    """One input of a stage run: where it is and why that location was used."""

    uri: str
    origin: Origin
    reason: str  # "named on the command line", "the params file's layout", "the model of REF"


def _upstream_input(source: str, name: str) -> Callable[[Mapping[str, str]], tuple[str, str] | None]:
    """The input `name` that the artifact given as `source` was built from (its manifest)."""

    def derive(given: Mapping[str, str]) -> tuple[str, str] | None:
        if source not in given or (not is_remote(given[source]) and not local_path(given[source]).is_dir()):
            return None  # not given, or a raw file (a TRL pairs file): no manifest to follow
        manifest = try_read_manifest(given[source])
        if manifest is None or name not in manifest.inputs:
            return None
        return manifest.inputs[name].uri, f"the {name} that {given[source]} was built from"

    return derive


@dataclass(frozen=True)
class InputRule:
    """How a stage input is found once the user names some other input of the stage."""

    derive: Callable[[Mapping[str, str]], tuple[str, str] | None] | None = None
    optional: bool = False  # the stage runs without it (and says so) rather than taking the layout's


# stage name -> input keyword -> rule. An input with no rule must be named.
INPUT_RULES: dict[str, dict[str, InputRule]] = {
    "sft_data": {"select": InputRule(optional=True)},  # a curation selection belongs to the file curation read
    "pretrain": {"tokenizer": InputRule(derive=_upstream_input("blocks", "tokenizer"))},
    "report": {"model": InputRule(derive=_upstream_input("evaluation", "model"))},
    "reward_model": {"model": InputRule(derive=_upstream_input("pairs", "model"))},
    "dpo_reference": {"model": InputRule(derive=_upstream_input("pairs", "model"))},
    "dpo": {"model": InputRule(derive=_upstream_input("reference", "model"))},
    "ppo": {"reward_model": InputRule(optional=True)},  # rewards can come from the configured functions
    "compare_test_time_compute": {"rl_evaluation": InputRule(optional=True)},
}


def resolve_inputs(
    stage_name: str, layout: Mapping[str, str], given: Mapping[str, str], layout_defaults: bool = False
) -> dict[str, ResolvedInput]:
    """The inputs of one stage run. `layout` is each input's location in the params file's
    layout; `given` what the user named. Raises `ConfigError` listing every input that would
    otherwise have come from the layout."""
    unknown = sorted(set(given) - set(layout))
    if unknown:
        raise ConfigError(f"{stage_name}: no input named {', '.join(unknown)}; its inputs are {', '.join(layout)}")
    if not given or layout_defaults:
        return {name: (ResolvedInput(given[name], "given", "named on the command line") if name in given
                       else ResolvedInput(uri, "default", "the params file's layout"))
                for name, uri in layout.items()}
    resolved = {name: ResolvedInput(uri, "given", "named on the command line") for name, uri in given.items()}
    missing = []
    for name, layout_uri in layout.items():
        if name in given:
            continue
        rule = INPUT_RULES.get(stage_name, {}).get(name, InputRule())
        derived = rule.derive(given) if rule.derive else None
        if derived is not None:
            resolved[name] = ResolvedInput(derived[0], "derived", derived[1])
        elif not rule.optional:
            missing.append(f"--{name} (the layout has {layout_uri})")
    if missing:
        raise ConfigError(
            f"{stage_name}: you named --{', --'.join(given)}, so the other inputs must be named too, not taken from "
            f"the params file's layout (the demo's files on a checkout where it ran): {'; '.join(missing)}. "
            "Name them, or pass --layout-defaults to use the layout on purpose."
        )
    return resolved

