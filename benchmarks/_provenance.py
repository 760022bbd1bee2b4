"""Where a results file came from: the one sentence every benchmark report opens with."""

from __future__ import annotations

from typing import Any


def written_by(script: str, code: dict[str, Any]) -> str:
    """"Written by SCRIPT at commit C (clean working tree)" -- or "(working tree with local
    changes)" -- from `components.artifacts.code_version().model_dump()`."""
    state = "working tree with local changes" if code["dirty"] else "clean working tree"
    return f"Written by {script} at commit {code['git_commit']} ({state})"
