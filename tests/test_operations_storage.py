"""The storage retry policy on its own: what counts as transient, backoff, the final message.
(The same wrapper against a real S3 server that goes away is in test_operations_s3.py.)"""

from __future__ import annotations

import errno

import pytest

from components.storage import RetryPolicy, StorageError, is_transient, retrying

FAST = RetryPolicy(attempts=4, initial_backoff_s=0.001, max_backoff_s=0.004)


def client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def translated(cause: Exception) -> OSError:
    """What s3fs raises: an OSError whose cause is botocore's ClientError."""
    try:
        raise OSError(errno.EIO, "translated") from cause
    except OSError as error:
        return error


@pytest.mark.parametrize("error, transient", [
    (client_error(503, "SlowDown"), True),
    (client_error(500, "InternalError"), True),
    (translated(client_error(502, "BadGateway")), True),
    (client_error(404, "NoSuchKey"), False),
    (client_error(403, "AccessDenied"), False),
    (translated(client_error(400, "InvalidBucketName")), False),
    (ConnectionResetError(104, "reset"), True),
    (ConnectionRefusedError(111, "refused"), True),
    (TimeoutError("read timed out"), True),
    (FileNotFoundError("s3://b/k"), False),
    (PermissionError("denied"), False),
    (ValueError("a bug"), False),
])
def test_what_is_transient(error: Exception, transient: bool) -> None:
    assert is_transient(error) is transient


def test_botocore_connection_faults_are_transient() -> None:
    from botocore.exceptions import ConnectionClosedError, EndpointConnectionError, ReadTimeoutError

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(ConnectionClosedError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(ReadTimeoutError(endpoint_url="http://127.0.0.1:9"))


def test_a_flaky_call_is_retried_until_it_succeeds() -> None:
    faults = [ConnectionResetError(104, "reset"), client_error(503, "SlowDown")]

    def flaky() -> str:
        if faults:
            raise faults.pop(0)
        return "done"

    assert retrying("s3://b/k", "uploading", flaky, policy=FAST) == "done"
    assert not faults


def test_a_permanent_error_is_not_retried() -> None:
    calls = []

    def missing() -> None:
        calls.append(1)
        raise FileNotFoundError("s3://b/k")

    with pytest.raises(FileNotFoundError):
        retrying("s3://b/k", "reading", missing, policy=FAST)
    assert calls == [1]


def test_giving_up_names_the_uri_operation_attempts_and_fault() -> None:
    calls = []

    def down() -> None:
        calls.append(1)
        raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(StorageError, match=r"s3://b/run/x: uploading a\.bin failed after 4 attempts over .* s at "
                                           r"the object store: ConnectionRefusedError: \[Errno 111\] Connection refused"):
        retrying("s3://b/run/x", "uploading a.bin", down, policy=FAST)
    assert len(calls) == 4


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(attempts=6, initial_backoff_s=0.5, max_backoff_s=4.0)
    for attempt, cap in enumerate([0.5, 1.0, 2.0, 4.0, 4.0]):
        delays = [policy.delay_s(attempt) for _ in range(200)]
        assert cap / 2 <= min(delays) and max(delays) <= cap


def test_the_policy_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUCIBLE_STORAGE_RETRY_ATTEMPTS", "3")
    monkeypatch.setenv("CRUCIBLE_STORAGE_RETRY_BACKOFF_S", "0.25")
    assert RetryPolicy.from_env() == RetryPolicy(attempts=3, initial_backoff_s=0.25, max_backoff_s=8.0)
    monkeypatch.setenv("CRUCIBLE_STORAGE_RETRY_ATTEMPTS", "many")
    with pytest.raises(StorageError, match="CRUCIBLE_STORAGE_RETRY_"):
        RetryPolicy.from_env()
