"""The artifact layer: atomic publish, manifests, content hashes, refusal of bad inputs, lineage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.artifacts import (
    MANIFEST_NAME, ComponentSpec, directory_content_hash, input_ref, lineage_lines, materialize, produce,
    read_manifest,
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
    with pytest.raises(ArtifactError, match="exists and is not an artifact"):
        upper(UpperConfig(), str(tmp_path / "half" / "data.txt"), str(tmp_path / "half"))


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


def test_s3_artifacts_round_trip(tmp_path: Path, raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real S3 protocol endpoint (moto's server on loopback) through s3fs."""
    moto_server = pytest.importorskip("moto.server")
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
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="crucible")
        fsspec.config.conf["s3"] = {"client_kwargs": {"endpoint_url": endpoint}}
        monkeypatch.setattr(fsspec.config, "conf", fsspec.config.conf)
        fsspec.filesystem("s3").clear_instance_cache()

        first = upper(UpperConfig(), str(raw), "s3://crucible/run/a")
        second = upper(UpperConfig(suffix="?"), "s3://crucible/run/a", "s3://crucible/run/b")
        assert read_manifest("s3://crucible/run/b").inputs["source"].content_hash == first.output.content_hash
        local = materialize(second.output)
        assert (local / "sub" / "out.txt").read_text() == "HELLO!?"
        assert "s3://crucible/run/a" in "\n".join(lineage_lines("s3://crucible/run/b"))
        with pytest.raises(ArtifactError, match="no such artifact"):
            read_manifest("s3://crucible/run/missing")
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()


def test_overwrite_forces_a_rebuild_and_file_uris_are_local_paths(tmp_path: Path, raw: Path) -> None:
    calls: list[str] = []
    dest = f"file://{tmp_path}/out"
    upper(UpperConfig(), str(raw), dest, calls)
    assert (tmp_path / "out" / MANIFEST_NAME).is_file()
    upper(UpperConfig(), str(raw), dest, calls)
    upper(UpperConfig(), str(raw), dest, calls, overwrite=True)
    assert len(calls) == 2
    with pytest.raises(ArtifactError, match="needs a directory of its own"):
        upper(UpperConfig(), str(raw), "/", calls, overwrite=True)


def test_lineage_reports_a_missing_upstream(tmp_path: Path, raw: Path) -> None:
    import shutil

    upper(UpperConfig(), str(raw), str(tmp_path / "a"))
    upper(UpperConfig(), str(tmp_path / "a"), str(tmp_path / "b"))
    shutil.rmtree(tmp_path / "a")
    assert "MISSING now" in "\n".join(lineage_lines(str(tmp_path / "b")))
