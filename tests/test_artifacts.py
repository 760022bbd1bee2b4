"""The artifact layer: atomic publish, manifests, content hashes, refusal of bad inputs, lineage."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from components.artifacts import (
    INCOMPLETE_MARKER, MANIFEST_NAME, ArtifactRef, ComponentSpec, cache_entry, code_version, directory_content_hash,
    input_origins,
    input_ref, lineage_lines, materialize, produce, read_manifest, rebuilding, reusable, stage_rerun,
)
from components.config import StrictConfig
from components.errors import ArtifactError

SPEC = ComponentSpec(name="upper", version="1")


class UpperConfig(StrictConfig):
    suffix: str = "!"


def upper(config: UpperConfig, source: str, dest: str, calls: list[str] | None = None, overwrite: bool = False):
    """A real (small) component: upper-cases a text file or the text of an `upper` artifact."""

    def build(out_dir: Path, paths: dict[str, Path]) -> dict:
        if calls is not None:
            calls.append(dest)
        source = paths["source"]
        source = source / "sub" / "out.txt" if source.is_dir() else source
        text = source.read_text().upper() + config.suffix
        (out_dir / "sub").mkdir()
        (out_dir / "sub" / "out.txt").write_text(text)
        return {"chars": len(text)}

    return produce(SPEC, config, {"source": source}, dest, build, overwrite=overwrite)


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    path = tmp_path / "raw.txt"
    path.write_text("hello")
    return path


def test_publish_writes_manifest_with_provenance(tmp_path: Path, raw: Path) -> None:
    manifest = upper(UpperConfig(), str(raw), str(tmp_path / "out"))
    on_disk = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert (tmp_path / "out/sub/out.txt").read_text() == "HELLO!"
    assert on_disk["component"] == {"name": "upper", "version": "1"}
    assert on_disk["config"] == {"suffix": "!"}
    assert on_disk["config_hash"] == UpperConfig().config_hash()
    assert on_disk["inputs"]["source"]["kind"] == "raw"
    assert on_disk["inputs"]["source"]["content_hash"].startswith("sha256:")
    assert on_disk["output"]["content_hash"] == directory_content_hash(tmp_path / "out")
    assert on_disk["metrics"] == {"chars": 6}
    assert on_disk["started_at"] <= on_disk["ended_at"]
    assert "git_commit" in on_disk["code_version"]
    assert manifest == read_manifest(str(tmp_path / "out"))


def test_the_recorded_commit_is_read_before_the_build(tmp_path: Path, raw: Path) -> None:
    """A build can run for an hour while the checkout moves on: the manifest names the commit the
    build started from (read once per process, before the first build), not the one at publish."""
    code_version.cache_clear()
    read_before_build: list[bool] = []

    def build(out_dir: Path, paths: dict[str, Path]) -> dict:
        read_before_build.append(code_version.cache_info().currsize == 1)
        (out_dir / "out.txt").write_text(paths["source"].read_text())
        return {}

    manifest = produce(SPEC, UpperConfig(suffix="?"), {"source": str(raw)}, str(tmp_path / "out"), build)
    assert read_before_build == [True] and manifest.code_version == code_version()


def test_content_hash_is_over_bytes_and_paths(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name / "x").mkdir(parents=True)
        (tmp_path / name / "x" / "f.bin").write_bytes(b"\x00\x01")
    assert directory_content_hash(tmp_path / "a") == directory_content_hash(tmp_path / "b")
    (tmp_path / "b" / "x" / "f.bin").rename(tmp_path / "b" / "x" / "g.bin")
    assert directory_content_hash(tmp_path / "a") != directory_content_hash(tmp_path / "b")


def test_unchanged_rerun_does_no_work_and_changed_config_is_refused(tmp_path: Path, raw: Path) -> None:
    calls: list[str] = []
    dest = str(tmp_path / "out")
    first = upper(UpperConfig(), str(raw), dest, calls)
    second = upper(UpperConfig(), str(raw), dest, calls)
    assert calls == [dest] and first == second
    with pytest.raises(ArtifactError, match=r"already holds a different artifact .*--overwrite"):
        upper(UpperConfig(suffix="?"), str(raw), dest, calls)
    assert (tmp_path / "out/sub/out.txt").read_text() == "HELLO!"  # untouched
    replaced = upper(UpperConfig(suffix="?"), str(raw), dest, calls, overwrite=True)
    assert (tmp_path / "out/sub/out.txt").read_text() == "HELLO?"
    assert replaced.cache_key != first.cache_key


def test_changed_input_bytes_rebuild(tmp_path: Path, raw: Path) -> None:
    calls: list[str] = []
    upper(UpperConfig(), str(raw), str(tmp_path / "out"), calls)
    raw.write_text("bye")
    with pytest.raises(ArtifactError, match="different artifact"):
        upper(UpperConfig(), str(raw), str(tmp_path / "out"), calls)


def test_failed_build_leaves_nothing_behind(tmp_path: Path, raw: Path) -> None:
    def failing(out_dir: Path, paths: dict[str, Path]) -> dict:
        (out_dir / "half.txt").write_text("partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        produce(SPEC, UpperConfig(), {"source": str(raw)}, str(tmp_path / "out"), failing)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw.txt"]


def test_failed_overwrite_keeps_the_previous_artifact(tmp_path: Path, raw: Path) -> None:
    upper(UpperConfig(), str(raw), str(tmp_path / "out"))

    def failing(out_dir: Path, paths: dict[str, Path]) -> dict:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        produce(SPEC, UpperConfig(suffix="?"), {"source": str(raw)}, str(tmp_path / "out"), failing, overwrite=True)
    assert (tmp_path / "out/sub/out.txt").read_text() == "HELLO!"
    assert read_manifest(str(tmp_path / "out")).config == {"suffix": "!"}


def test_directory_without_manifest_is_refused_as_input(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "data.txt").write_text("x")
    with pytest.raises(ArtifactError, match=r"half: not a complete artifact \(no manifest.json\)"):
        input_ref(str(tmp_path / "half"))
    with pytest.raises(ArtifactError, match=r"exists and is not an artifact \(no manifest.json; it holds data.txt\)"):
        upper(UpperConfig(), str(tmp_path / "half" / "data.txt"), str(tmp_path / "half"), overwrite=True)
    assert (tmp_path / "half" / "data.txt").read_text() == "x"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("rerun", [False, True])
def test_overwrite_never_deletes_a_folder_that_is_not_an_artifact(tmp_path: Path, rerun: bool) -> None:
    """Issue 14 case 8: the output folder held the user's own data (the stage's input) and notes;
    `--overwrite` deleted both. It is refused, with or without overwrite, by either driver, and
    the error lists what is there."""
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "my_data.jsonl").write_text('{"text": "mine"}\n')
    (mine / "NOTES.txt").write_text("do not lose")
    for index in range(5):
        (mine / f"extra_{index}.txt").write_text(str(index))
    before = _tree(tmp_path)
    token = stage_rerun.set(rerun)
    try:
        for overwrite in (False, True):
            with pytest.raises(ArtifactError, match=r"mine: exists and is not an artifact \(no manifest.json; it holds "
                                                    r"NOTES.txt, extra_0.txt, .* and 3 more\); it is never replaced"):
                upper(UpperConfig(), str(mine / "my_data.jsonl"), str(mine), overwrite=overwrite)
    finally:
        stage_rerun.reset(token)
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging left behind


def test_an_interrupted_write_is_replaced(tmp_path: Path, raw: Path) -> None:
    """A folder marked incomplete (a remote write that stopped before its manifest) is ours to replace."""
    dest = tmp_path / "out"
    (dest / "sub").mkdir(parents=True)
    (dest / INCOMPLETE_MARKER).write_text("")
    (dest / "sub" / "out.txt").write_text("half")
    upper(UpperConfig(), str(raw), str(dest))
    assert (dest / "sub/out.txt").read_text() == "HELLO!" and not (dest / INCOMPLETE_MARKER).exists()


def test_a_stage_rerun_replaces_its_own_artifact_not_another_components(tmp_path: Path, raw: Path) -> None:
    """Issue 14 case 11, the drivers' one policy: under `stage_rerun` (CLI stage commands and
    Prefect flows) a changed config replaces the same component's artifact, as `dvc repro`
    does; another component's artifact needs overwrite."""
    dest = str(tmp_path / "out")
    upper(UpperConfig(), str(raw), dest)
    token = stage_rerun.set(True)
    try:
        replaced = upper(UpperConfig(suffix="?"), str(raw), dest)
        assert (tmp_path / "out/sub/out.txt").read_text() == "HELLO?" and replaced.config == {"suffix": "?"}
        other = ComponentSpec(name="other", version="1")

        def build(out_dir: Path, paths: dict[str, Path]) -> dict:
            (out_dir / "x.txt").write_text("x")
            return {}

        with pytest.raises(ArtifactError, match=r"already holds a different artifact \(upper v1.*--overwrite"):
            produce(other, UpperConfig(), {"source": str(raw)}, dest, build)
        assert (tmp_path / "out/sub/out.txt").read_text() == "HELLO?"
        assert produce(other, UpperConfig(), {"source": str(raw)}, dest, build, overwrite=True).component == other
    finally:
        stage_rerun.reset(token)


def test_input_origins_are_recorded_shown_and_optional(tmp_path: Path, raw: Path) -> None:
    dest = tmp_path / "out"
    token = input_origins.set({"source": "given", "unused": "default"})
    try:
        manifest = upper(UpperConfig(), str(raw), str(dest))
    finally:
        input_origins.reset(token)
    assert manifest.input_origins == {"source": "given"}  # only this component's inputs
    assert lineage_lines(str(dest))[1].endswith("unchanged  (given)")
    on_disk = json.loads((dest / MANIFEST_NAME).read_text())
    del on_disk["input_origins"]  # a manifest written before the field existed still loads
    (dest / MANIFEST_NAME).write_text(json.dumps(on_disk))
    assert read_manifest(str(dest)).input_origins == {}


def test_corrupt_manifest_and_edited_bytes_are_detected(tmp_path: Path, raw: Path) -> None:
    upper(UpperConfig(), str(raw), str(tmp_path / "out"))
    (tmp_path / "out/sub/out.txt").write_text("tampered")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        materialize(input_ref(str(tmp_path / "out")))
    (tmp_path / "out" / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ArtifactError, match="corrupt manifest"):
        read_manifest(str(tmp_path / "out"))


def test_lineage_walks_to_raw_and_flags_changes(tmp_path: Path, raw: Path) -> None:
    upper(UpperConfig(), str(raw), str(tmp_path / "a"))
    upper(UpperConfig(suffix="?"), str(tmp_path / "a"), str(tmp_path / "b"))
    lines = lineage_lines(str(tmp_path / "b"))
    assert "[upper v1]" in lines[0]
    assert lines[1].strip() == "source:"
    assert str(raw) in lines[-1] and lines[-1].endswith("unchanged")
    raw.write_text("edited")
    assert "CHANGED since" in lineage_lines(str(tmp_path / "b"))[-1]


@pytest.fixture
def s3_bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real S3 protocol endpoint (moto's server on loopback) through s3fs; yields s3://BUCKET,
    a new bucket each time (moto's servers in one process share their buckets)."""
    moto_server = pytest.importorskip("moto.server")
    import uuid

    import boto3
    import fsspec

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        bucket = f"crucible-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}}
        monkeypatch.setattr(fsspec.config, "conf", fsspec.config.conf)
        fsspec.filesystem("s3").clear_instance_cache()
        yield f"s3://{bucket}"
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()


def test_s3_artifacts_round_trip(s3_bucket: str, raw: Path) -> None:
    first = upper(UpperConfig(), str(raw), f"{s3_bucket}/run/a")
    second = upper(UpperConfig(suffix="?"), f"{s3_bucket}/run/a", f"{s3_bucket}/run/b")
    assert read_manifest(f"{s3_bucket}/run/b").inputs["source"].content_hash == first.output.content_hash
    local = materialize(second.output)
    assert (local / "sub" / "out.txt").read_text() == "HELLO!?"
    assert f"{s3_bucket}/run/a" in "\n".join(lineage_lines(f"{s3_bucket}/run/b"))
    with pytest.raises(ArtifactError, match="no such artifact"):
        read_manifest(f"{s3_bucket}/run/missing")


def test_overwrite_reuses_an_up_to_date_artifact_and_rebuild_forces_a_run(tmp_path: Path, raw: Path) -> None:
    calls: list[str] = []
    dest = f"file://{tmp_path}/out"
    first = upper(UpperConfig(), str(raw), dest, calls)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()
    assert upper(UpperConfig(), str(raw), dest, calls) == first
    assert upper(UpperConfig(), str(raw), dest, calls, overwrite=True) == first  # up to date: reused, not rebuilt
    assert len(calls) == 1
    with rebuilding():
        rebuilt = upper(UpperConfig(), str(raw), dest, calls)
    assert len(calls) == 2 and rebuilt.started_at > first.started_at
    assert rebuilt.output.content_hash == first.output.content_hash
    with pytest.raises(ArtifactError, match="needs a directory of its own"):
        upper(UpperConfig(), str(raw), "/", calls, overwrite=True)


def test_an_edited_artifact_is_never_reused_under_its_cache_key(tmp_path: Path, raw: Path) -> None:
    """Same config, same inputs, so the same cache key, but bytes that no longer hash to the
    manifest: refused without --overwrite, rebuilt with it, and never offered for reuse."""
    calls: list[str] = []
    dest = str(tmp_path / "out")
    first = upper(UpperConfig(), str(raw), dest, calls)
    assert reusable(dest, first.cache_key) == first
    (tmp_path / "out/sub/out.txt").write_text("TAMPERED!")
    assert reusable(dest, first.cache_key) is None
    with pytest.raises(ArtifactError, match=r"out: holds this artifact but its bytes do not match its manifest .*--overwrite"):
        upper(UpperConfig(), str(raw), dest, calls)
    assert (tmp_path / "out/sub/out.txt").read_text() == "TAMPERED!" and calls == [dest]  # nothing written
    rebuilt = upper(UpperConfig(), str(raw), dest, calls, overwrite=True)
    assert calls == [dest, dest] and (tmp_path / "out/sub/out.txt").read_text() == "HELLO!"
    assert rebuilt.cache_key == first.cache_key and reusable(dest, first.cache_key) == rebuilt


def test_lineage_reports_a_missing_upstream(tmp_path: Path, raw: Path) -> None:
    import shutil

    upper(UpperConfig(), str(raw), str(tmp_path / "a"))
    upper(UpperConfig(), str(tmp_path / "a"), str(tmp_path / "b"))
    shutil.rmtree(tmp_path / "a")
    assert "MISSING now" in "\n".join(lineage_lines(str(tmp_path / "b")))


# --------------------------------------------------------------------------- the download cache (issue 13, item 7)

TRAVERSALS = ["../victim", "sha256:../../victim", "/srv/victim", "sha256-" + "0" * 64, "sha256:" + "A" * 64,
              "sha256:" + "0" * 63, "sha256:" + "0" * 64 + "/../../victim"]


@pytest.mark.parametrize("content_hash", TRAVERSALS)
def test_a_content_hash_that_is_not_sha256_hex_is_refused_everywhere(
        tmp_path: Path, raw: Path, content_hash: str) -> None:
    with pytest.raises(ValidationError, match="content_hash"):
        ArtifactRef(uri="s3://crucible/run/a", content_hash=content_hash)
    upper(UpperConfig(), str(raw), str(tmp_path / "out"))
    manifest = json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    manifest["output"]["content_hash"] = content_hash
    (tmp_path / "out" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"out/manifest.json: corrupt manifest: output.content_hash"):
        read_manifest(str(tmp_path / "out"))


@pytest.mark.parametrize("forged", ["../victim", "{tmp}/victim", "sha256:../../victim"])
def test_a_traversing_hash_never_makes_materialize_return_a_local_directory(tmp_path: Path, forged: str) -> None:
    """A reference built without validation (`model_copy(update=...)` skips it) whose hash would
    place the cache entry on an existing directory outside the cache: refused before any look-up
    (the old code returned that directory as a verified input)."""
    content_hash = forged.format(tmp=tmp_path)
    cache = Path(os.environ["CRUCIBLE_CACHE_DIR"])
    victim = Path(content_hash) / "a" if content_hash.startswith("/") else cache / content_hash.replace(":", "-") / "a"
    victim.mkdir(parents=True, exist_ok=True)
    (victim / "secret.txt").write_text("not an artifact")
    valid = ArtifactRef(uri="s3://crucible/run/a", content_hash="sha256:" + "0" * 64)
    with pytest.raises(ArtifactError, match=r"s3://crucible/run/a: content hash .* is not 'sha256:' and 64 hex"):
        materialize(valid.model_copy(update={"content_hash": content_hash}))


@pytest.mark.parametrize("uri", ["s3://crucible/run/..", "s3://crucible/run/../", "s3://.."])
def test_a_uri_ending_in_dot_dot_is_refused(uri: str) -> None:
    cache = Path(os.environ["CRUCIBLE_CACHE_DIR"])
    digest = "sha256:" + "0" * 64
    (cache / digest.replace(":", "-") / ".." / "secret.txt").parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(ArtifactError, match="must end in a file or directory name"):
        materialize(ArtifactRef(uri=uri, content_hash=digest))


def test_a_symlink_planted_in_the_cache_is_refused(tmp_path: Path, s3_bucket: str, raw: Path) -> None:
    published = upper(UpperConfig(), str(raw), f"{s3_bucket}/run/a")
    entry = cache_entry(published.output)
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "out.txt").write_text("HELLO!")  # even the right bytes: the entry is not the cache's own
    entry.parent.mkdir(parents=True)
    entry.symlink_to(victim, target_is_directory=True)
    with pytest.raises(ArtifactError, match="resolves outside the cache root"):
        materialize(published.output)


def test_a_corrupt_cache_entry_is_dropped_and_downloaded_again(s3_bucket: str, raw: Path) -> None:
    published = upper(UpperConfig(), str(raw), f"{s3_bucket}/run/a")
    local = materialize(published.output)
    assert local == cache_entry(published.output)
    (local / "sub" / "out.txt").write_text("EDITED IN THE CACHE")
    (local / "planted.txt").write_text("x")
    again = materialize(published.output)
    assert again == local and (again / "sub" / "out.txt").read_text() == "HELLO!"
    assert not (again / "planted.txt").exists()
    assert directory_content_hash(again) == published.output.content_hash


def test_a_remote_artifact_edited_in_the_store_is_refused_and_never_cached(s3_bucket: str, raw: Path) -> None:
    import fsspec

    published = upper(UpperConfig(), str(raw), f"{s3_bucket}/run/a")
    fsspec.filesystem("s3").pipe_file(f"{s3_bucket}/run/a/sub/out.txt", b"EDITED IN THE STORE")
    with pytest.raises(ArtifactError, match="does not match its manifest"):
        materialize(published.output)
    entry = cache_entry(published.output)
    assert not entry.exists() and not list(entry.parent.glob("*.partial-*"))
