"""`dvc repro` over the same components, in a temporary git repository, with a local remote."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from components.artifacts import directory_content_hash, read_manifest
from flows.stages import STAGES
from tests.conftest import REPO_ROOT, TINY_PARAMS

pytestmark = pytest.mark.slow

IGNORED = shutil.ignore_patterns(".venv", ".git", "artifacts", "__pycache__", ".dvc-storage", "cache", "tmp",
                                 "*.egg-info", ".pytest_cache", "benchmarks", "tests")


GIT_ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def sh(*args: str, cwd: Path) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, env=GIT_ENV)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def ran_stages(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=IGNORED)
    params = {**TINY_PARAMS, "artifacts_root": "artifacts",
              "data": {"raw_train": "data/raw/gsm8k/train.jsonl", "raw_heldout": "data/raw/gsm8k/test.jsonl"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    sh("git", "init", "-q", cwd=repo)
    sh("dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "remote"), cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "project", cwd=repo)
    return repo


def test_repro_is_incremental_and_round_trips_through_a_remote(project: Path, tmp_path: Path) -> None:
    first = sh("dvc", "repro", cwd=project)
    assert sorted(ran_stages(first)) == sorted(stage.name for stage in STAGES if stage.dvc_file == "dvc.yaml")
    assert "Data and pipelines are up to date" in sh("dvc", "repro", cwd=project)

    metrics = sh("dvc", "metrics", "show", "--json", cwd=project)
    assert "heldout_perplexity" in metrics and "unigram_perplexity" in metrics
    assert "loss_curve.csv" in sh("dvc", "plots", "show", "--json", cwd=project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["report"]["title"] = "changed title"
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh("dvc", "repro", cwd=project)) == ["report"]
    params["evaluate"]["max_docs"] = 10
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    assert ran_stages(sh("dvc", "repro", cwd=project)) == ["evaluate", "report"]

    hashes = {s.name: read_manifest(str(project / "artifacts" / s.name)).output.content_hash for s in STAGES
              if s.dvc_file == "dvc.yaml"}
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "results", cwd=project)
    sh("dvc", "push", cwd=project)

    clone = tmp_path / "clone"
    sh("git", "clone", "-q", str(project), str(clone), cwd=tmp_path)
    sh("dvc", "pull", "dvc.yaml", cwd=clone)  # this pipeline's outputs (real/dvc.yaml's were never built)
    for name, expected in hashes.items():
        assert directory_content_hash(clone / "artifacts" / name) == expected
        assert read_manifest(str(clone / "artifacts" / name)).output.content_hash == expected
    assert "Data and pipelines are up to date" in sh("dvc", "repro", cwd=clone)
