"""Artifacts: directories at a URI, published atomically, described by `manifest.json`.

An artifact is complete exactly when its `manifest.json` exists; the manifest is written
last. Content hashes are over file bytes (sorted relative paths + per-file sha256), never
over pickles, so two artifacts with equal bytes have equal hashes wherever they live.

Local paths and `s3://` (or any fsspec URI) are both supported. A component never touches
fsspec itself: `produce` hands it local input paths and a local staging directory.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

import fsspec
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from components import storage
from components.config import StrictConfig
from components.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
INCOMPLETE_MARKER = "_INCOMPLETE"  # written first on remote stores, removed after the manifest
MANIFEST_SCHEMA_VERSION = 1
_HASH_CHUNK_BYTES = 1 << 20
# A content hash names a directory of the download cache, so it must be exactly this and
# nothing a path could be made of ("../victim", "/etc").
CONTENT_HASH_PATTERN = r"^sha256:[0-9a-f]{64}$"
ContentHash = Annotated[str, StringConstraints(pattern=CONTENT_HASH_PATTERN)]

log = logging.getLogger(__name__)

# The orchestrator's run id, set by whichever driver runs the component (a Prefect flow sets
# its flow run id). Scoped with a ContextVar so concurrent tasks never see each other's id.
orchestrator_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "orchestrator_run_id", default=None
)

# The cache key of the component run being built, set by `produce` around `build` and read
# only through `run_directory`.
_current_build_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_build_key", default=None)

# A driver's explicit request to run components even where the output is up to date
# (`crucible STAGE --rebuild`, like `dvc repro --force`): for code changed without a version
# bump, or to measure a run again. Without it an up-to-date, verified output is reused.
rebuild_requested: contextvars.ContextVar[bool] = contextvars.ContextVar("rebuild_requested", default=False)

# Set by a stage driver (`crucible STAGE`, `crucible run`): a stage may replace the previous
# artifact of its own component at its output, as `dvc repro` reruns a stage whose params
# changed. Without it (a component called directly) any different artifact needs `overwrite`.
stage_rerun: contextvars.ContextVar[bool] = contextvars.ContextVar("stage_rerun", default=False)

# Where each input of the stage being run came from, set by the driver that resolved them
# (`flows.stages.run_stage`): {input name: "given" | "default" | "derived: <reason>"}. `produce`
# records the entries for its own inputs in the manifest, so a report can say which file was a default.
input_origins: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("input_origins", default=None)

_LISTED_ENTRIES = 5  # entries of a refused non-artifact folder named in the error


class ContentMismatchError(ArtifactError):
    """An artifact's bytes do not hash to the content hash its manifest (or reference) records."""


class ComponentSpec(BaseModel):
    """Name and semantic version of a component. Bump the version when outputs change meaning."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str
    version: str


class ArtifactRef(BaseModel):
    """A pointer to an input or output: a URI and the content hash of what is there."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    uri: str
    content_hash: ContentHash
    kind: Literal["artifact", "raw"] = "artifact"


class CodeVersion(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    git_commit: str | None
    dirty: bool | None


class Manifest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = MANIFEST_SCHEMA_VERSION
    component: ComponentSpec
    config: dict[str, Any]
    config_hash: str
    cache_key: str
    inputs: dict[str, ArtifactRef]
    output: ArtifactRef
    code_version: CodeVersion
    flow_run_id: str | None
    started_at: str
    ended_at: str
    metrics: dict[str, Any]
    # input name -> "given" | "default" | "derived: <reason>"; absent in manifests written before it
    input_origins: dict[str, str] = {}


# --------------------------------------------------------------------------- locations


def display_uri(uri: str | os.PathLike[str]) -> str:
    """Normalise a URI for manifests: local paths relative to the working directory when
    inside it (so a repository's artifacts stay valid in another clone), else absolute."""
    text = os.fspath(uri)
    if is_remote(text):
        return text.rstrip("/")
    path = local_path(text).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def local_path(uri: str) -> Path:
    """The filesystem path of a local URI (a plain path or file://...)."""
    return Path(uri.removeprefix("file://"))


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, path = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as error:
        raise ArtifactError(f"{uri}: cannot open this location: {error}") from None
    if is_remote(uri):
        storage.check_location(uri, fs, path)  # a wrong endpoint or bucket fails here, fast
    return fs, path


def _io(uri: str, operation: str, fn: Callable[[], Any], fs: fsspec.AbstractFileSystem) -> Any:
    """One storage operation; on a remote store retried through transient faults."""
    return storage.retrying(uri, operation, fn, fs=fs) if is_remote(uri) else fn()


# --------------------------------------------------------------------------- hashing


def run_directory(dest: str) -> Path:
    """Where the component run being built keeps state across attempts (a trainer's live metrics
    and checkpoints): next to a local destination (`<dest>.runs/<cache key>`), else under
    `$CRUCIBLE_RUNS_DIR` (default ~/.cache/crucible/runs). Keyed by the run's cache key, so a
    rerun of the same config on the same inputs resumes and any other run starts afresh."""
    key = (_current_build_key.get() or "no-key").split(":")[-1][:16]
    if is_remote(dest):
        root = Path(os.environ.get("CRUCIBLE_RUNS_DIR", Path.home() / ".cache" / "crucible" / "runs"))
        return root / dest.replace("://", "/").strip("/") / key
    dest_path = local_path(dest).absolute()
    return dest_path.with_name(f"{dest_path.name}.runs") / key


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def _content_files(root: Path) -> list[Path]:
    """Every file of an artifact but its own manifest and the incomplete marker, sorted."""
    bookkeeping = {MANIFEST_NAME, INCOMPLETE_MARKER}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in bookkeeping)


def directory_content_hash(root: Path) -> str:
    """sha256 over (relative path, file sha256) for every content file, sorted."""
    digest = hashlib.sha256()
    files = _content_files(root)
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(b"\0")
        digest.update(file_sha256(path).encode())
        digest.update(b"\n")
    return "sha256:" + digest.hexdigest()


def cache_key(spec: ComponentSpec, config: StrictConfig, inputs: Mapping[str, ArtifactRef]) -> str:
    """Component name + version + config hash + input content hashes (DESIGN.md, caching).

    The same key is used by the Prefect task cache and by `produce` to recognise an
    up-to-date output, so the drivers agree on what "unchanged" means. User code the config
    names (`module:function` reward functions) is not covered by the component version: the
    hash of each function's module file joins the key, only when there is any, so keys of
    configs without user code are unchanged.
    """
    payload: dict[str, Any] = {
        "component": spec.name,
        "version": spec.version,
        "config_hash": config.config_hash(),
        "inputs": {name: ref.content_hash for name, ref in sorted(inputs.items())},
    }
    code = config.code_fingerprints()
    if code:
        payload["code"] = code
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


# --------------------------------------------------------------------------- reading


def try_read_manifest(uri: str) -> Manifest | None:
    """The manifest at `uri`, or None when there is none. A corrupt manifest is an error."""
    fs, path = _fs(uri)
    manifest_path = f"{path.rstrip('/')}/{MANIFEST_NAME}"

    def read() -> bytes:
        with fs.open(manifest_path, "rb") as handle:
            return handle.read()

    try:
        raw = _io(uri, f"reading {MANIFEST_NAME}", read, fs)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ArtifactError(f"{uri}: cannot read {MANIFEST_NAME}: {error}") from None
    try:
        return Manifest.model_validate_json(raw)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ArtifactError(f"{uri}/{MANIFEST_NAME}: corrupt manifest: {where}: {first['msg']}") from None


def read_manifest(uri: str) -> Manifest:
    """The manifest of a complete artifact; refuses a directory without one."""
    manifest = try_read_manifest(uri)
    if manifest is None:
        fs, path = _fs(uri)
        if not _io(uri, "checking existence", lambda: fs.exists(path), fs):
            raise ArtifactError(f"{uri}: no such artifact")
        raise ArtifactError(
            f"{uri}: not a complete artifact (no {MANIFEST_NAME}); it was never published or its write was interrupted"
        )
    return manifest


def input_ref(uri: str) -> ArtifactRef:
    """Reference to an input: an artifact directory (hash from its manifest, cheap) or a
    raw file (hash of its bytes)."""
    fs, path = _fs(uri)
    if _io(uri, "checking the input", lambda: fs.isfile(path), fs):
        if is_remote(uri):
            def remote_hash() -> str:
                digest = hashlib.sha256()
                with fs.open(path, "rb") as handle:
                    while chunk := handle.read(_HASH_CHUNK_BYTES):
                        digest.update(chunk)
                return "sha256:" + digest.hexdigest()

            content_hash = _io(uri, "hashing the input", remote_hash, fs)
        else:
            content_hash = "sha256:" + file_sha256(Path(path))
        return ArtifactRef(uri=display_uri(uri), content_hash=content_hash, kind="raw")
    if not _io(uri, "checking the input", lambda: fs.exists(path), fs):
        raise ArtifactError(f"{uri}: input not found")
    if try_read_manifest(uri) is None and not is_remote(uri) and _is_hf_directory(local_path(uri)):
        return ArtifactRef(uri=display_uri(uri), content_hash=directory_content_hash(local_path(uri)), kind="raw")
    return read_manifest(uri).output.model_copy(update={"uri": display_uri(uri)})


def _is_hf_directory(path: Path) -> bool:
    """A `datasets.Dataset.save_to_disk` directory or a transformers model directory (a hub
    snapshot, a `save_pretrained` output): raw input, hashed over its files."""
    dataset = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    model = (path / "config.json").is_file() and any(path.glob("*.safetensors"))
    return dataset or model


def _cache_root() -> Path:
    return Path(os.environ.get("CRUCIBLE_CACHE_DIR", Path.home() / ".cache" / "crucible"))


def _checked_hash(ref: ArtifactRef) -> str:
    """`ref.content_hash`, refused unless it is "sha256:" and 64 hex digits. ArtifactRef checks
    this when built from data; a copy made with `model_copy(update=...)` skips validation, and
    the hash becomes a directory name, so it is checked again where it is used."""
    if not re.fullmatch(CONTENT_HASH_PATTERN, ref.content_hash):
        raise ArtifactError(f"{ref.uri}: content hash {ref.content_hash!r} is not 'sha256:' and 64 hex digits")
    return ref.content_hash


def cache_entry(ref: ArtifactRef) -> Path:
    """Where the bytes of remote `ref` are cached: ROOT/sha256-<hex>/<last name of the URI>.

    The name keeps a raw file's extension for readers that look at it. Every entry is
    refused unless it resolves to exactly that place under the cache root, so neither a
    hash, a URI ending in `..`, nor a symbolic link planted in the cache can point a
    reader at another local directory.
    """
    digest = _checked_hash(ref).replace(":", "-")
    name = PurePosixPath(ref.uri.split("://", 1)[-1].rstrip("/")).name
    if name in ("", ".", "..") or "\\" in name:
        raise ArtifactError(f"{ref.uri}: a remote artifact's URI must end in a file or directory name (got {name!r})")
    root = _cache_root().resolve()
    entry = root / digest / name
    if entry.resolve() != entry:
        raise ArtifactError(f"{entry}: this cache entry of {ref.uri} resolves outside the cache root {root} "
                            "(a symbolic link?); remove it")
    return entry


def materialize(ref: ArtifactRef) -> Path:
    """A local path holding the bytes of `ref`, verified against its content hash.

    Local inputs are used in place; remote ones are downloaded once into a cache keyed by
    content hash (see `cache_entry`). A cache hit is verified before use too: an entry
    that no longer matches (a disk fault, an edit) is dropped and downloaded again. A
    mismatch of what is at `ref.uri` (a corrupt or edited artifact) is a `ContentMismatchError`.
    """
    if not is_remote(ref.uri):
        local = local_path(ref.uri)
        _verify(local, ref)
        return local
    local = cache_entry(ref)
    if local.exists():
        try:
            _verify(local, ref)
            return local
        except ContentMismatchError as error:
            log.warning("%s: dropping the cached copy at %s: %s", ref.uri, local, error)
            _remove(local)
    _download(ref, local)
    return local


def _download(ref: ArtifactRef, local: Path) -> None:
    """Download `ref` into a partial path, verify it, then rename it to `local`: a bad
    download never enters the cache."""
    fs, path = _fs(ref.uri)
    partial = local.with_name(local.name + f".partial-{uuid.uuid4().hex}")
    partial.parent.mkdir(parents=True, exist_ok=True)

    def download() -> None:
        _remove(partial)  # a retry starts from nothing, never on top of a partial download
        fs.get(path, str(partial), recursive=fs.isdir(path))

    try:
        _io(ref.uri, "downloading", download, fs)
        _verify(partial, ref)
        partial.rename(local)
    except OSError:
        if not local.exists():  # else another process published the same verified bytes first
            raise
    finally:
        _remove(partial)


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _verify(local: Path, ref: ArtifactRef) -> None:
    if not local.exists():
        raise ArtifactError(f"{ref.uri}: not found at {local}")
    actual = directory_content_hash(local) if local.is_dir() else "sha256:" + file_sha256(local)
    if actual != ref.content_hash:
        raise ContentMismatchError(
            f"{ref.uri}: content hash {actual[:19]} does not match its manifest ({ref.content_hash[:19]}); "
            "the artifact is corrupt or was edited"
        )


# --------------------------------------------------------------------------- writing


@functools.cache
def code_version() -> CodeVersion:
    """Git commit and dirty flag of the checkout this code runs from (None outside git)."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return CodeVersion(git_commit=None, dirty=None)
    return CodeVersion(git_commit=commit, dirty=bool(status.strip()))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _foreign_entries(uri: str) -> list[str] | None:
    """What is at an output location that holds no manifest: None where `produce` may write
    there (nothing, an empty folder, or an interrupted write marked `_INCOMPLETE`), else the
    sorted names of what is there (["<a file>"] for a file). Such a folder may hold the
    user's own data: it is never deleted, whatever `overwrite` says."""
    fs, path = _fs(uri)

    def entries() -> list[str] | None:
        if not fs.exists(path):
            return None
        if not fs.isdir(path):
            return ["<a file, not a folder>"]
        names = sorted(Path(e.rstrip("/")).name for e in fs.ls(path, detail=False))
        return None if not names or INCOMPLETE_MARKER in names else names

    return _io(uri, "checking the output location", entries, fs)


def _refuse_foreign(dest: str, names: list[str]) -> ArtifactError:
    shown = ", ".join(names[:_LISTED_ENTRIES]) + (f" and {len(names) - _LISTED_ENTRIES} more"
                                                   if len(names) > _LISTED_ENTRIES else "")
    return ArtifactError(f"{dest}: exists and is not an artifact (no {MANIFEST_NAME}; it holds {shown}); it is never "
                         "replaced, even with --overwrite: choose another output or move these files away")


def _publish_local(staging: Path, dest: Path) -> None:
    """Swap the finished staging directory into place with renames on one filesystem."""
    if not dest.exists():
        staging.rename(dest)
        return
    retired = dest.with_name(f".{dest.name}.retired-{uuid.uuid4().hex[:8]}")
    dest.rename(retired)
    try:
        staging.rename(dest)
    except OSError:
        retired.rename(dest)  # put the previous artifact back
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _publish_remote(staging: Path, dest: str) -> None:
    """Object stores have no rename: unpublish what was there (its manifest first, so it is
    never complete and half-replaced), mark incomplete, upload, write the manifest, unmark.
    An overwrite on an object store is therefore not atomic: once it starts, the previous
    version is gone (keep history with bucket versioning or the DVC remote).

    Each step is retried through transient faults and is safe to repeat; if one still fails,
    the marker stays (or the manifest was never written), so the next run replaces it."""
    fs, path = _fs(dest)
    path = path.rstrip("/")

    def unpublish() -> None:
        if fs.exists(f"{path}/{MANIFEST_NAME}"):
            fs.rm_file(f"{path}/{MANIFEST_NAME}")
        if fs.exists(path):
            fs.rm(path, recursive=True)

    _io(dest, "removing the previous version", unpublish, fs)
    _io(dest, f"writing {INCOMPLETE_MARKER}", lambda: fs.pipe_file(f"{path}/{INCOMPLETE_MARKER}", b""), fs)
    for local in _content_files(staging):
        relative = local.relative_to(staging).as_posix()
        _io(dest, f"uploading {relative}",
            lambda local=local, relative=relative: fs.put_file(str(local), f"{path}/{relative}"), fs)
    _io(dest, f"uploading {MANIFEST_NAME}",
        lambda: fs.put_file(str(staging / MANIFEST_NAME), f"{path}/{MANIFEST_NAME}"), fs)
    _io(dest, f"removing {INCOMPLETE_MARKER}", lambda: fs.rm_file(f"{path}/{INCOMPLETE_MARKER}"), fs)
    fs.invalidate_cache(path)


def content_mismatch(manifest: Manifest, dest: str) -> str | None:
    """Why the bytes at `dest` are not the output `manifest` records, or None when they are
    (hashed in place locally; downloaded into the verified cache from a remote store)."""
    try:
        materialize(manifest.output.model_copy(update={"uri": display_uri(dest)}))
    except ContentMismatchError as error:
        return str(error)
    return None


def reusable(dest: str, key: str) -> Manifest | None:
    """The manifest at `dest` when it holds the artifact `key` describes with verified bytes:
    what `produce` reuses without running the component. Any driver may ask before running."""
    existing = try_read_manifest(dest)
    if existing is None or existing.cache_key != key or content_mismatch(existing, dest) is not None:
        return None
    return existing


@contextlib.contextmanager
def rebuilding() -> Iterator[None]:
    """Inside this block `produce` runs its component even where the output is up to date."""
    token = rebuild_requested.set(True)
    try:
        yield
    finally:
        rebuild_requested.reset(token)


BuildFn = Callable[[Path, dict[str, Path]], dict[str, Any]]


def _reuse_or_refuse(spec: ComponentSpec, dest: str, key: str, overwrite: bool) -> Manifest | None:
    """`produce`'s look-up: the verified artifact at `dest` that `key` describes, to return
    as is; None to build; an error where building would replace what `overwrite` does not allow."""
    existing = try_read_manifest(dest)
    if existing is not None and existing.cache_key == key:
        if rebuild_requested.get():
            return None
        mismatch = content_mismatch(existing, dest)
        if mismatch is None:
            log.info("%s: up to date at %s (verified)", spec.name, dest)
            return existing
        if not overwrite:
            raise ArtifactError(f"{dest}: holds this artifact but its bytes do not match its manifest ({mismatch}); "
                                "pass --overwrite to rebuild it")
        log.warning("%s: rebuilding %s: %s", spec.name, dest, mismatch)
    elif existing is not None and not overwrite:
        if not (stage_rerun.get() and existing.component.name == spec.name):
            raise ArtifactError(
                f"{dest}: already holds a different artifact ({existing.component.name} "
                f"v{existing.component.version}, config {existing.config_hash[:12]}); "
                "choose another output or pass --overwrite"
            )
        log.warning("%s: replacing its previous artifact at %s (config %s, now %s): a rerun of this stage",
                    spec.name, dest, existing.config_hash[:12], key[:12])
    elif existing is None and (foreign := _foreign_entries(dest)) is not None:
        raise _refuse_foreign(dest, foreign)
    return None


def _checked_destination(dest: str, remote: bool) -> Path | None:
    """`dest` as an absolute local path (None when remote), refused if it is the root or the working directory."""
    dest_path = None if remote else local_path(dest).absolute()
    if dest_path is not None and dest_path in (Path(dest_path.anchor), Path.cwd()):
        raise ArtifactError(f"{dest}: an artifact needs a directory of its own, not the root or the working directory")
    return dest_path


def _staging_directory(dest_path: Path | None) -> Path:
    """A new staging directory: a hidden sibling of a local `dest_path`, a temporary directory for a remote one."""
    if dest_path is None:
        staging = Path(tempfile.mkdtemp(prefix="crucible-staging-"))
    else:
        dest_path.parent.mkdir(parents=True, exist_ok=True)
        staging = dest_path.with_name(f".{dest_path.name}.staging-{uuid.uuid4().hex[:8]}")
        staging.mkdir()
    return staging


def _build_under_key(build: BuildFn, staging: Path, input_paths: dict[str, Path], key: str) -> dict[str, Any]:
    """The metrics `build` returns, run with `key` as the current build's cache key."""
    key_token = _current_build_key.set(key)
    try:
        return build(staging, input_paths)
    finally:
        _current_build_key.reset(key_token)


def _new_manifest(spec: ComponentSpec, config: StrictConfig, key: str, input_refs: dict[str, ArtifactRef], dest: str,
                  staging: Path, started_at: str, code: CodeVersion, metrics: dict[str, Any]) -> Manifest:
    """The manifest of the artifact built in `staging` for `dest` from `code`, ended now."""
    return Manifest(
        component=spec,
        config=config.model_dump(mode="json"),
        config_hash=config.config_hash(),
        cache_key=key,
        inputs=input_refs,
        output=ArtifactRef(uri=display_uri(dest), content_hash=directory_content_hash(staging)),
        code_version=code,
        flow_run_id=orchestrator_run_id.get(),
        input_origins={name: origin for name, origin in (input_origins.get() or {}).items() if name in input_refs},
        started_at=started_at,
        ended_at=_now(),
        metrics=metrics,
    )


def produce(
    spec: ComponentSpec,
    config: StrictConfig,
    inputs: Mapping[str, str | ArtifactRef],
    dest: str,
    build: BuildFn,
    overwrite: bool = False,
) -> Manifest:
    """Run one component: resolve inputs, build into staging, publish, write the manifest last.

    `build(out_dir, input_paths)` writes the artifact's files into `out_dir` and returns its
    metrics. `dest` is a run cache shared by every driver (as DVC's run cache is): if it
    holds the artifact this exact config and these inputs make (the same cache key) and its
    bytes still hash to its manifest's content hash, that manifest is returned and nothing
    runs, whoever published it (the CLI, `dvc repro`, a Prefect run on another server).
    Anything else at `dest` is replaced only with `overwrite`: a different artifact or this
    artifact with corrupt or edited bytes (which is never reused); under `stage_rerun` (a
    stage driver) the previous artifact of the same component is replaced without it. A
    folder without a manifest (the user's own files) is never replaced. `rebuild_requested`
    (set by the driver) runs the component even when the output is up to date. A failure
    anywhere leaves `dest` as it was. An input given as an `ArtifactRef` is not hashed again
    (a caller running many components over one input resolves it once); its bytes are still
    verified against that hash before use.
    """
    input_refs = {name: uri if isinstance(uri, ArtifactRef) else input_ref(uri) for name, uri in inputs.items()}
    key = cache_key(spec, config, input_refs)
    remote = is_remote(dest)
    dest_path = _checked_destination(dest, remote)
    up_to_date = _reuse_or_refuse(spec, dest, key, overwrite)
    if up_to_date is not None:
        return up_to_date

    input_paths = {name: materialize(ref) for name, ref in input_refs.items()}
    staging = _staging_directory(dest_path)
    try:
        started_at, code = _now(), code_version()  # the commit read before a long build, not after HEAD moved
        metrics = _build_under_key(build, staging, input_paths, key)
        manifest = _new_manifest(spec, config, key, input_refs, dest, staging, started_at, code, metrics)
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
        if remote:
            _publish_remote(staging, dest)
        else:
            _publish_local(staging, dest_path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: published %s (%s)", spec.name, dest, manifest.output.content_hash[:19])
    return manifest


# --------------------------------------------------------------------------- lineage


def lineage_lines(
    uri: str, indent: str = "", expected_hash: str | None = None, seen: set[str] | None = None
) -> list[str]:
    """The chain from an artifact back to its raw inputs, one line per node, indented.

    Lineage is a DAG: an artifact reached a second time is printed once and then referred
    to. Each input is checked against the hash recorded when it was read, so a replaced
    upstream artifact or an edited raw file shows up in the chain.
    """
    seen = set() if seen is None else seen
    manifest = read_manifest(uri)
    commit = manifest.code_version.git_commit
    code = f"{commit[:10]}{'+dirty' if manifest.code_version.dirty else ''}" if commit else "no git"
    lines = [
        f"{indent}{display_uri(uri)}  [{manifest.component.name} v{manifest.component.version}] "
        f"{manifest.output.content_hash[:19]}  config {manifest.config_hash[:12]}  code {code}  "
        f"at {manifest.ended_at}"
        + ("" if expected_hash in (None, manifest.output.content_hash) else f"  REPLACED since read (was {expected_hash[:19]})")
    ]
    if manifest.output.content_hash in seen:
        return [lines[0].split("  config ")[0] + "  (inputs shown above)"]
    seen.add(manifest.output.content_hash)
    for name, ref in sorted(manifest.inputs.items()):
        child_indent = indent + "  "
        origin = f"  ({manifest.input_origins[name]})" if name in manifest.input_origins else ""
        if ref.kind == "raw":
            try:
                now = input_ref(ref.uri).content_hash
                state = "unchanged" if now == ref.content_hash else f"CHANGED since (now {now[:19]})"
            except ArtifactError:
                state = "MISSING now"
            lines.append(f"{child_indent}{name}: {ref.uri}  [raw] {ref.content_hash[:19]}  {state}{origin}")
        else:
            lines.append(f"{child_indent}{name}:{origin}")
            try:
                lines.extend(lineage_lines(ref.uri, child_indent + "  ", ref.content_hash, seen))
            except ArtifactError as error:
                lines.append(f"{child_indent}  {ref.uri}  MISSING now ({error})")
    return lines
