"""The package layers of DESIGN.md hold: a module imports only its own package or packages
below it, including imports inside functions and under TYPE_CHECKING, and never another
module's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Bottom to top. Packages on one line share a layer and may not import each other.
LAYERS = [
    {"core"},  # components/*.py: errors, config, storage, artifacts, records, runlog, locks
    {"tasks"},
    {"models"},
    {"data", "feasibility"},
    {"agents"},
    {"train"},
    {"eval"},
    {"flows"},
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def package_of(module: str) -> str | None:
    """`components.train.grpo` -> train; `components.errors` -> core; `flows.cli` -> flows."""
    parts = module.split(".")
    if parts[0] == "flows":
        return "flows"
    if parts[0] != "components":
        return None
    return parts[1] if len(parts) > 2 or (ROOT / "components" / parts[-1]).is_dir() else "core"


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import anywhere in the tree."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = module.split(".")[:-node.level]
                target = ".".join(base + ([target] if target else []))
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return found


def violations(source: str, module: str) -> list[str]:
    """What `source` (the text of `module`) imports against the layers."""
    own = package_of(module)
    problems = []
    for line, target, names in imported_modules(ast.parse(source), module):
        other = package_of(target)
        if other is None or own is None:
            continue
        if other != own and RANK[other] >= RANK[own]:
            problems.append(f"{module}:{line} imports {target} ({other} is not below {own})")
        private = [name for name in names if name.startswith("_") and not name.startswith("__")]
        if private and target != module.rsplit(".", 1)[0]:
            problems.append(f"{module}:{line} imports private {', '.join(private)} from {target}")
    return problems


def repo_modules() -> list[tuple[str, Path]]:
    paths = sorted((ROOT / "components").rglob("*.py")) + sorted((ROOT / "flows").rglob("*.py"))
    return [(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), p) for p in paths]


def test_every_package_is_in_a_layer() -> None:
    packages = {package_of(module) for module, _ in repo_modules()}
    assert packages <= set(RANK), packages - set(RANK)


def test_no_module_imports_against_the_layers() -> None:
    problems = [problem for module, path in repo_modules()
                for problem in violations(path.read_text(encoding="utf-8"), module)]
    assert problems == []


@pytest.mark.parametrize(("module", "source", "expected"), [
    ("components.data.preferences", "def f():\n    from components.eval.accuracy import read_problems\n", "eval is not below data"),
    ("components.train.rl", "from components.eval.generate import sample\n", "eval is not below train"),
    ("components.data.pack", "from components.feasibility import flops\n", "feasibility is not below data"),
    ("components.tasks.verifiers", "import components.models.sampling\n", "models is not below tasks"),
    ("components.eval.accuracy", "from components.models.factory import _MODEL_LOCK\n", "private _MODEL_LOCK"),
    ("components.artifacts", "from components.train import engine\n", "train is not below core"),
])
def test_the_check_catches_an_import_against_the_layers(module: str, source: str, expected: str) -> None:
    problems = violations(source, module)
    assert len(problems) == 1 and expected in problems[0]


def test_the_check_allows_imports_downward_and_within_a_package() -> None:
    source = ("from components.errors import DataError\nfrom components.models.chat import prompt_ids\n"
              "from components.train.losses import dpo_loss\nfrom .engine import TrainData\n")
    assert violations(source, "components.train.grpo") == []
