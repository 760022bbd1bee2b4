"""Every DVC stage depends on the code it runs: each module its component imports, directly or
through other modules (imports inside functions included), lies under one of the stage's
`deps`, so `dvc repro` reruns a stage when any of that code changes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from flows.stages import STAGES_BY_NAME

ROOT = Path(__file__).resolve().parents[1]


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported(path: Path, module: str) -> set[str]:
    """Absolute names of the `components` modules `path` imports (a `from pkg import mod` counts mod)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            target = node.module if not node.level else ".".join(module.split(".")[:-node.level] + [node.module])
            names.add(target)
            names |= {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in names if name.startswith("components") and module_file(name) is not None}


def code_closure(modules: set[str]) -> set[Path]:
    """The files of `modules` and of everything they import, transitively."""
    seen: set[str] = set()
    todo = list(modules)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += imported(module_file(module), module) - seen
    return {module_file(module).relative_to(ROOT) for module in seen} - {Path("components/__init__.py")}


def uncovered(files: set[Path], deps: list[str]) -> list[str]:
    return sorted(str(f) for f in files if not any(f == Path(d) or Path(d) in f.parents for d in deps))


DVC_FILES = ("dvc.yaml", "real/dvc.yaml", "agents/dvc.yaml")


def dvc_stages(dvc_file: str = "dvc.yaml") -> dict:
    return yaml.safe_load((ROOT / dvc_file).read_text(encoding="utf-8"))["stages"]


@pytest.mark.parametrize("dvc_file,name", [(f, name) for f in DVC_FILES for name in sorted(dvc_stages(f))])
def test_a_stage_depends_on_all_the_code_it_runs(dvc_file: str, name: str) -> None:
    stage = STAGES_BY_NAME[name]
    modules = {entry.__module__ for _, entry in stage.task_components()}
    assert uncovered(code_closure(modules), dvc_stages(dvc_file)[name]["deps"]) == []


def test_every_stage_is_in_the_dvc_pipeline_its_table_entry_names() -> None:
    listed = {name: dvc_file for dvc_file in DVC_FILES for name in dvc_stages(dvc_file)}
    assert listed == {name: stage.dvc_file for name, stage in STAGES_BY_NAME.items()}
    for chain in ("real", "agents"):  # each chain's stages run from the root on the chain's own params file
        stages, params_file = dvc_stages(f"{chain}/dvc.yaml"), f"{chain}/params.yaml"
        assert all(entry["wdir"] == ".." and entry["cmd"] == f"crucible {name} --config {params_file}"
                   and list(entry["params"][0]) == [params_file] for name, entry in stages.items())
        sections = {key.split(".")[0] for entry in stages.values() for key in entry["params"][0][params_file]}
        assert sections <= yaml.safe_load((ROOT / params_file).read_text(encoding="utf-8")).keys()


def test_the_check_finds_code_missing_from_the_deps() -> None:
    files = code_closure({"components.train.grpo"})
    assert Path("components/models/sampling.py") in files  # imported inside a module, through `from components.models import sampling`
    assert uncovered(files, ["components/train", "components/artifacts.py"])  # models, tasks, core modules are missing
    assert uncovered(files, ["components"]) == []
