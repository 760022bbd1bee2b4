"""Crucible on an S3 endpoint (moto's server on 127.0.0.1, found through AWS_ENDPOINT_URL):
the pipeline with `artifacts_root: s3://...`, lineage across its artifacts, Prefect results on
S3, a DVC remote on S3, credentials never written anywhere, a wrong endpoint or bucket failing
fast, and the object store going away mid-flow (retried through, or a clean failure that a
rerun resumes)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, TINY_PARAMS, write_params

pytestmark = pytest.mark.slow
moto_server = pytest.importorskip("moto.server")

ACCESS_KEY = "AKIACRUCIBLETESTKEY0"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class S3:
    """A moto S3 server we can stop and start again on the same port (its data lives in this
    process, so it survives a restart, as a real store's would)."""

    port: int
    bucket: str
    secret: str
    server: object = None
    down_events: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def keys(self) -> set[str]:
        """Object keys, read from moto's in-process backend (works while the server is down)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        bucket = s3_backends[DEFAULT_ACCOUNT_ID]["aws"].buckets[self.bucket]
        while True:
            try:
                return set(list(bucket.keys.keys()))
            except RuntimeError:  # changed size while we read it: read again
                continue

    def objects(self) -> dict[str, bytes]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint)
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            for item in page.get("Contents", []):
                found[item["Key"]] = client.get_object(Bucket=self.bucket, Key=item["Key"])["Body"].read()
        return found

    def outage_when(self, key: str, seconds: float | None, restart: threading.Event | None = None) -> threading.Thread:
        """Stop the server as soon as `key` appears (e.g. a stage's _INCOMPLETE marker: mid-publish),
        start it again after `seconds`, or when `restart` is set."""

        def watch() -> None:
            deadline = time.monotonic() + 900
            while key not in self.keys():
                if time.monotonic() > deadline:
                    return
                time.sleep(0.005)
            self.stop()
            self.down_events.append(key)
            if seconds is not None:
                time.sleep(seconds)
            else:
                restart.wait(900)
            self.start()

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        return thread


def _clear_s3fs_instances() -> None:
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3]:
    import boto3

    store = S3(port=_free_port(), bucket=f"crucible-{uuid.uuid4().hex[:8]}", secret=f"secret-{uuid.uuid4().hex}")
    store.start()
    # credentials only through the standard AWS chain; the endpoint through AWS_ENDPOINT_URL (as for MinIO)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", store.endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    _clear_s3fs_instances()
    boto3.client("s3", endpoint_url=store.endpoint).create_bucket(Bucket=store.bucket)
    try:
        yield store
    finally:
        store.stop()
        _clear_s3fs_instances()


def manifests(s3: S3, root: str) -> dict[str, dict]:
    from components.artifacts import read_manifest
    from flows.stages import PIPELINE_STAGES

    return {stage.name: read_manifest(f"s3://{s3.bucket}/{root}/{stage.name}").model_dump(mode="json")
            for stage in PIPELINE_STAGES}


def assert_lineage_intact(s3: S3, root: str) -> None:
    """Every stage's recorded inputs are the artifacts now published upstream, and the chain
    from the last stage walks back to the raw files, all unchanged."""
    from components.artifacts import lineage_lines
    from flows.stages import PIPELINE_STAGES

    found = manifests(s3, root)
    for stage in PIPELINE_STAGES:
        for keyword, source in stage.inputs.items():
            recorded = found[stage.name]["inputs"][keyword]
            if source in found:
                assert recorded["uri"] == f"s3://{s3.bucket}/{root}/{source}"
                assert recorded["content_hash"] == found[source]["output"]["content_hash"], (stage.name, keyword)
    for last in ("report", "compare_test_time_compute"):
        lines = "\n".join(lineage_lines(f"s3://{s3.bucket}/{root}/{last}"))
        assert "REPLACED" not in lines and "MISSING" not in lines and "CHANGED" not in lines, lines
        assert "data/raw/gsm8k/train.jsonl" in lines or last == "compare_test_time_compute"
    assert "data/raw/gsm8k/train.jsonl" in "\n".join(lineage_lines(f"s3://{s3.bucket}/{root}/report"))


def assert_nothing_half_written(s3: S3, root: str) -> set[str]:
    """Every object belongs to an artifact that is either complete (its manifest, bytes matching
    the manifest's hash) or visibly incomplete (the _INCOMPLETE marker, no manifest). Returns
    the incomplete ones."""
    from components.artifacts import INCOMPLETE_MARKER, MANIFEST_NAME, materialize, read_manifest

    keys = {key for key in s3.keys() if key.startswith(f"{root}/")}
    complete = {key.rsplit("/", 1)[0] for key in keys if key.endswith(f"/{MANIFEST_NAME}")}
    marked = {key.rsplit("/", 1)[0] for key in keys if key.endswith(f"/{INCOMPLETE_MARKER}")}
    for key in keys:
        assert any(key.startswith(f"{artifact}/") for artifact in complete | marked), f"{key}: in no artifact"
    for artifact in complete:
        materialize(read_manifest(f"s3://{s3.bucket}/{artifact}").output)  # verifies every byte
    return marked - complete


def test_pipeline_on_s3_keeps_lineage_and_results_there_and_never_writes_the_secret(
        prefect_api, s3: S3, tmp_path: Path, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture) -> None:
    from prefect.client.orchestration import get_client
    from prefect.filesystems import RemoteFileSystem
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_LOCAL_STORAGE_PATH

    from flows.pipeline import pipeline

    # Our own loggers at DEBUG (what the secret must never reach). Not the root logger: that
    # turns on botocore's per-request debug records (response bodies included), which Prefect's
    # console handler renders one by one and which made this test run for tens of minutes.
    caplog.set_level(logging.INFO, logger="prefect")
    for ours in ("components", "flows"):  # last: set_level also sets caplog's handler to its level
        caplog.set_level(logging.DEBUG, logger=ours)
    params_file = write_params(tmp_path / "params.yaml", f"s3://{s3.bucket}/run")
    results = RemoteFileSystem(basepath=f"s3://{s3.bucket}/prefect-results")  # no settings: no credentials
    results.save(f"results-{s3.bucket}", overwrite=True)
    on_s3 = pipeline.with_options(result_storage=results)

    first = on_s3(params_file=str(params_file))
    assert not any(info["cached"] for info in first.values())
    assert all(info["uri"] == f"s3://{s3.bucket}/run/{name}" for name, info in first.items())
    assert_lineage_intact(s3, "run")
    assert manifests(s3, "run")["pretrain"]["flow_run_id"]
    result_keys = [k for k in s3.keys() if k.startswith("prefect-results/")]
    assert result_keys, "no Prefect result was written to the S3 result storage"

    second = on_s3(params_file=str(params_file))  # cache keys and results read back from S3
    assert all(info["cached"] for info in second.values()), second
    assert {k: v["content_hash"] for k, v in second.items()} == {k: v["content_hash"] for k, v in first.items()}

    # the secret is in this process's environment only: nowhere in what was produced
    async def all_logs() -> str:
        async with get_client() as client:
            return "\n".join(log.message for log in await client.read_logs())

    import asyncio

    produced: dict[str, bytes] = {f"s3://{s3.bucket}/{key}": data for key, data in s3.objects().items()}
    local_roots = [tmp_path, Path(os.environ["CRUCIBLE_CACHE_DIR"]), Path(PREFECT_LOCAL_STORAGE_PATH.value())]
    database = PREFECT_API_DATABASE_CONNECTION_URL.value() or ""
    assert database.startswith("sqlite") and "///" in database
    database_file = Path(database.split("///", 1)[1])
    local_roots.append(database_file.parent)  # the database, its WAL and journal
    for root in local_roots:
        for path in ([root] if root.is_file() else root.rglob("*")):
            if path.is_file():
                produced[str(path)] = path.read_bytes()
    captured = capfd.readouterr()
    produced["<prefect logs>"] = asyncio.run(all_logs()).encode()
    produced["<stdout+stderr>"] = (captured.out + captured.err).encode()
    produced["<python logs>"] = caplog.text.encode()
    assert str(database_file) in produced and f"s3://{s3.bucket}/run/pretrain/manifest.json" in produced
    assert str(params_file) in produced and any(name.startswith("s3://") and "prefect-results" in name
                                                for name in produced)
    leaked = [name for name, data in produced.items() if s3.secret.encode() in data]
    assert not leaked, f"the secret access key was written to {leaked}"


def test_a_wrong_endpoint_or_bucket_fails_fast_naming_the_uri(s3: S3, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from components.errors import ArtifactError
    from flows.params import load_params
    from flows.stages import STAGES_BY_NAME, run_stage

    missing_bucket = load_params(write_params(tmp_path / "p1.yaml", "s3://no-such-bucket-crucible/run"))
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=r"s3://no-such-bucket-crucible/run/arithmetic_task: bucket "
                                            r"'no-such-bucket-crucible' does not exist at http://127\.0\.0\.1"):
        run_stage(STAGES_BY_NAME["arithmetic_task"], missing_bucket)
    assert time.monotonic() - started < 10

    dead = _free_port()  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{dead}")
    _clear_s3fs_instances()
    wrong_endpoint = load_params(write_params(tmp_path / "p2.yaml", f"s3://{s3.bucket}/run"))
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=rf"s3://{s3.bucket}/run/arithmetic_task: cannot reach the object "
                                            rf"store at http://127\.0\.0\.1:{dead}"):
        run_stage(STAGES_BY_NAME["arithmetic_task"], wrong_endpoint)
    assert time.monotonic() - started < 30  # botocore's own retries only, not a full retry budget
    assert not any(key.startswith("run/") for key in s3.keys())  # no work started


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_an_outage_mid_flow_is_retried_through_or_fails_cleanly_and_the_rerun_resumes(
        prefect_api, s3: S3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from components.artifacts import INCOMPLETE_MARKER
    from components.storage import StorageError
    from flows.pipeline import pipeline

    retries = _Records()
    logging.getLogger("components.storage").addHandler(retries)
    # a budget of 7.5 to 15 s per operation: enough for a 3 s restart, not for a long outage
    monkeypatch.setenv("CRUCIBLE_STORAGE_RETRY_ATTEMPTS", "5")
    monkeypatch.setenv("CRUCIBLE_STORAGE_RETRY_BACKOFF_S", "1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # no botocore retries: ours are the ones under test
    params_file = write_params(tmp_path / "params.yaml", f"s3://{s3.bucket}/run")

    # 1. the store restarts while pretrain is publishing: the flow retries through it, and the
    #    store goes away for good while sft publishes: the flow fails, naming the location
    restart = threading.Event()
    first_outage = s3.outage_when(f"run/pretrain/{INCOMPLETE_MARKER}", seconds=3)
    s3.outage_when(f"run/sft/{INCOMPLETE_MARKER}", seconds=None, restart=restart)
    try:
        with pytest.raises(StorageError, match=rf"s3://{s3.bucket}/run/sft: .* failed after 5 attempts over "
                                               rf".* at http://127\.0\.0\.1:{s3.port}"):
            pipeline(params_file=str(params_file))
    finally:
        logging.getLogger("components.storage").removeHandler(retries)
    first_outage.join(timeout=60)
    assert s3.down_events == [f"run/pretrain/{INCOMPLETE_MARKER}", f"run/sft/{INCOMPLETE_MARKER}"]
    retried = "\n".join(retries.lines)
    assert f"s3://{s3.bucket}/run/pretrain: uploading" in retried and "transient fault" in retried
    restart.set()
    time.sleep(0.5)

    # 2. nothing looks complete that is not: pretrain (retried through) is whole, sft is marked
    assert assert_nothing_half_written(s3, "run") == {"run/sft"}
    keys = s3.keys()
    assert "run/pretrain/manifest.json" in keys and "run/sft/manifest.json" not in keys
    assert f"run/sft/{INCOMPLETE_MARKER}" in keys
    published = {name: m["ended_at"] for name, m in _published_manifests(s3, "run").items()}
    assert {"curate", "tokenizer", "pack", "estimate", "pretrain", "evaluate", "report", "sft_data"} <= set(published)

    # 3. the rerun resumes: published stages come from cache, the rest is built
    result = pipeline(params_file=str(params_file))
    rebuilt = {name for name, info in result.items() if not info["cached"]}
    assert rebuilt == set(result) - set(published), rebuilt
    assert "sft" in rebuilt and "pretrain" not in rebuilt
    after = {name: m["ended_at"] for name, m in _published_manifests(s3, "run").items()}
    assert all(after[name] == ended for name, ended in published.items())  # untouched
    assert assert_nothing_half_written(s3, "run") == set()
    assert_lineage_intact(s3, "run")


def _published_manifests(s3: S3, root: str) -> dict[str, dict]:
    from components.artifacts import MANIFEST_NAME

    return {key.split("/")[1]: json.loads(data) for key, data in s3.objects().items()
            if key.startswith(f"{root}/") and key.count("/") == 2 and key.endswith(f"/{MANIFEST_NAME}")}


def _sh(*args: str, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def test_dvc_remote_on_s3_round_trips_to_a_fresh_clone(s3: S3, tmp_path: Path) -> None:
    from components.artifacts import directory_content_hash, read_manifest
    from tests.test_dvc import IGNORED

    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    repo = tmp_path / "repo"
    shutil.copytree(REPO_ROOT, repo, ignore=IGNORED)
    params = {**TINY_PARAMS, "artifacts_root": "artifacts",
              "data": {"raw_train": "data/raw/gsm8k/train.jsonl", "raw_heldout": "data/raw/gsm8k/test.jsonl"}}
    (repo / "params.yaml").write_text(yaml.safe_dump(params))
    _sh("git", "init", "-q", cwd=repo, env=env)
    _sh("dvc", "remote", "add", "-f", "-d", "store", f"s3://{s3.bucket}/dvc", cwd=repo, env=env)
    _sh("dvc", "remote", "modify", "store", "endpointurl", s3.endpoint, cwd=repo, env=env)
    stages = ["arithmetic_task", "curate_heldout"]  # two cheap stages with no upstream
    _sh("dvc", "repro", *stages, cwd=repo, env=env)
    hashes = {name: read_manifest(str(repo / "artifacts" / name)).output.content_hash for name in stages}
    _sh("git", "add", "-A", cwd=repo, env=env)
    _sh("git", "commit", "-qm", "results", cwd=repo, env=env)
    _sh("dvc", "push", cwd=repo, env=env)
    assert any(key.startswith("dvc/files/md5/") for key in s3.keys())

    clone = tmp_path / "clone"
    _sh("git", "clone", "-q", str(repo), str(clone), cwd=tmp_path, env=env)
    assert not (clone / "artifacts").exists()
    _sh("dvc", "pull", *stages, cwd=clone, env=env)
    for name, expected in hashes.items():
        assert directory_content_hash(clone / "artifacts" / name) == expected
        assert read_manifest(str(clone / "artifacts" / name)).output.content_hash == expected
    assert "up to date" in _sh("dvc", "status", *stages, cwd=clone, env=env).lower()

    config = (repo / ".dvc" / "config").read_text()
    assert s3.endpoint in config and "secret" not in config and ACCESS_KEY not in config
    for root in (repo, clone):
        for path in root.rglob("*"):
            if path.is_file():
                assert s3.secret.encode() not in path.read_bytes(), path
