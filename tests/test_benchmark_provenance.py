"""Every benchmark report opens with the commit it was written at and whether the tree was clean."""

from __future__ import annotations

from benchmarks._provenance import written_by
from benchmarks._real_model import markdown_head
from components.artifacts import code_version


def test_a_report_names_its_commit_and_whether_the_tree_had_local_changes() -> None:
    code = code_version().model_dump()
    assert written_by("benchmarks/x.py", {**code, "dirty": False}) == (
        f"Written by benchmarks/x.py at commit {code['git_commit']} (clean working tree)")
    assert written_by("benchmarks/x.py", {**code, "dirty": True}).endswith("(working tree with local changes)")
    head = markdown_head("Title", "benchmarks/x.py", {"command": "cmd", "code": {**code, "dirty": True}})
    assert head[:3] == ["# Title", "", "`cmd`"] and "working tree with local changes" in head[4]
