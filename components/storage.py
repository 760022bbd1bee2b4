"""Object-store calls that survive transient faults, and a fail-fast check of a location.

Three layers retry, each at its own level: botocore retries one HTTP request
(`AWS_MAX_ATTEMPTS`, `AWS_RETRY_MODE`), s3fs retries its own calls a few times, and
`retrying` here retries one artifact operation (a manifest read, an upload, a download of
an artifact's directory) with exponential backoff and jitter ("Exponential Backoff And
Jitter", AWS Architecture Blog, 2015), after dropping fsspec's listing cache so a retry
never trusts a listing taken before the fault. Transient means a 5xx or throttling
response, a timeout or a refused / reset connection; a missing object, a denied request or a
bad bucket name fail at once.

Credentials come only from the standard AWS chain (environment, shared config, instance
role): nothing here reads, stores or prints them. The endpoint comes from
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` (MinIO, a test server) or fsspec's configuration.
"""

from __future__ import annotations

import logging
import os
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import fsspec

from components.errors import ArtifactError

log = logging.getLogger(__name__)

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({500, 502, 503, 504})
TRANSIENT_CODES = frozenset({"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "Throttling",
                             "ThrottlingException", "RequestTimeTooSkewed"})
PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


class StorageError(ArtifactError):
    """An object store could not be reached, or kept failing after every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """How long one operation keeps trying: `attempts` tries, waits doubling from
    `initial_backoff_s` up to `max_backoff_s`, each scaled by a random factor in [0.5, 1]."""

    attempts: int = 6
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    @classmethod
    def from_env(cls) -> "RetryPolicy":
        """`CRUCIBLE_STORAGE_RETRY_ATTEMPTS`, `..._BACKOFF_S`, `..._MAX_BACKOFF_S` override the defaults."""
        default = cls()
        try:
            return cls(
                attempts=max(1, int(os.environ.get("CRUCIBLE_STORAGE_RETRY_ATTEMPTS", default.attempts))),
                initial_backoff_s=float(os.environ.get("CRUCIBLE_STORAGE_RETRY_BACKOFF_S", default.initial_backoff_s)),
                max_backoff_s=float(os.environ.get("CRUCIBLE_STORAGE_RETRY_MAX_BACKOFF_S", default.max_backoff_s)),
            )
        except ValueError as error:
            raise StorageError(f"CRUCIBLE_STORAGE_RETRY_*: not a number: {error}") from None

    def delay_s(self, attempt: int) -> float:
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def is_transient(error: BaseException) -> bool:
    """A fault worth retrying: 5xx or throttling, a timeout, a refused or dropped connection."""
    chain = _chain(error)
    if isinstance(chain[0], PERMANENT):
        return False
    for cause in chain:
        response = getattr(cause, "response", None)
        if isinstance(response, dict):  # botocore ClientError (s3fs keeps it as the cause)
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            return status in TRANSIENT_STATUS or code in TRANSIENT_CODES
        if isinstance(cause, (TimeoutError, ConnectionError)):  # builtins: reset, refused, aborted
            return True
        if _is_network_error(cause):
            return True
    return False


def _is_network_error(error: BaseException) -> bool:
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError, HTTPClientError
    except ImportError:  # no S3 support installed: nothing botocore-specific to recognise
        return False
    try:
        from aiohttp import ClientConnectionError, ClientPayloadError
    except ImportError:
        ClientConnectionError = ClientPayloadError = ()  # type: ignore[assignment,misc]
    return isinstance(error, (BotoConnectionError, HTTPClientError, ClientConnectionError, ClientPayloadError))


def endpoint_of(fs: fsspec.AbstractFileSystem) -> str:
    """Where an object store lives, for error messages (never credentials)."""
    client = getattr(fs, "_s3", None)  # s3fs's botocore client, once connected: the endpoint it really uses
    kwargs = getattr(fs, "client_kwargs", None) or {}
    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or kwargs.get("endpoint_url")
    if endpoint:
        return str(endpoint)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("s3", "s3a"):
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"
    return str(protocol)


def retrying(uri: str, operation: str, fn: Callable[[], T], fs: fsspec.AbstractFileSystem | None = None,
             policy: RetryPolicy | None = None) -> T:
    """`fn()`, retried on transient faults; after the last attempt a `StorageError` naming the
    URI, the operation, the endpoint and the last fault. `fn` must be safe to repeat."""
    policy = policy or RetryPolicy.from_env()
    started = time.monotonic()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - classified below; anything else re-raised as is
            if not is_transient(error):
                raise
            if attempt + 1 == policy.attempts:
                where = endpoint_of(fs) if fs is not None else "the object store"
                raise StorageError(
                    f"{uri}: {operation} failed after {policy.attempts} attempts over "
                    f"{time.monotonic() - started:.1f} s at {where}: {_describe(error)}"
                ) from error
            delay = policy.delay_s(attempt)
            log.warning("%s: %s: transient fault (%s); retry %d/%d in %.1f s", uri, operation, _describe(error),
                        attempt + 1, policy.attempts - 1, delay)
            if fs is not None:
                fs.invalidate_cache()
            time.sleep(delay)
    raise AssertionError("unreachable")


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}".strip()


# buckets already checked, per filesystem instance (by identity: fsspec instances that compare
# equal may have been made under different endpoints)
_checked: dict[int, tuple[weakref.ref, set[str]]] = {}


def _checked_buckets(fs: fsspec.AbstractFileSystem) -> set[str]:
    ref, buckets = _checked.get(id(fs), (None, set()))
    if ref is None or ref() is not fs:
        buckets = set()
        _checked[id(fs)] = (weakref.ref(fs), buckets)
    return buckets


def check_location(uri: str, fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Fail fast, once per process and bucket, when an S3 endpoint cannot be reached or the
    bucket does not exist: one attempt (plus botocore's own retries), so a typo costs seconds,
    not a full retry budget, and no work starts against a store that is not there."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol not in ("s3", "s3a"):
        return
    bucket = path.split("/", 1)[0]
    checked = _checked_buckets(fs)
    if bucket in checked:
        return
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except Exception as error:  # noqa: BLE001 - every failure here is reported with the URI
        endpoint = endpoint_of(fs)
        if isinstance(error, (FileNotFoundError,)) or _status(error) == 404:
            raise StorageError(f"{uri}: bucket '{bucket}' does not exist at {endpoint}; create it first") from None
        if isinstance(error, PermissionError) or _status(error) == 403:
            raise StorageError(f"{uri}: access to bucket '{bucket}' at {endpoint} was denied "
                               "(credentials come from the standard AWS chain)") from None
        if is_transient(error):
            raise StorageError(f"{uri}: cannot reach the object store at {endpoint}: {_describe(error)}") from None
        raise StorageError(f"{uri}: cannot use bucket '{bucket}' at {endpoint}: {_describe(error)}") from None
    checked.add(bucket)


def _status(error: BaseException) -> int | None:
    for cause in _chain(error):
        response = getattr(cause, "response", None)
        if isinstance(response, dict):
            return response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None
