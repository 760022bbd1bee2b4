"""The Python sandbox contains each escape attempt and reports it, under real bubblewrap.

Each attempt that a plain interpreter could carry out is first run unsandboxed (the venv's
python, same code) to show it succeeds there, so the sandboxed failure is the sandbox's doing;
each limit is shown both hit and, raised, not hit.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from pathlib import Path

import pytest

from components.agents.sandbox import SandboxLimits, run_python
from tests.conftest import REPO_ROOT

LIMITS = SandboxLimits()


def unsandboxed(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)


def process_running(marker: str, wait_seconds: float = 0.0) -> bool:
    """Whether a process on this machine has `marker` in its command line (polled for wait_seconds)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if marker.encode() in cmdline.read_bytes():
                    return True
            except OSError:
                pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


@pytest.fixture
def sandbox_parent(monkeypatch: pytest.MonkeyPatch):
    """A directory (traversable by `nobody`) where run_python's mkdtemp makes its sandbox dirs."""
    parent = tempfile.mkdtemp(prefix="sandbox-parent-")
    os.chmod(parent, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", parent)
    yield Path(parent)
    shutil.rmtree(parent)


def test_runs_code_and_returns_its_output() -> None:
    result = run_python("import sys\nprint('hello', 6 * 7)\nprint('warn', file=sys.stderr)", LIMITS)
    assert (result.stdout, result.stderr, result.exit_code, result.limit) == ("hello 42\n", "warn\n", 0, None)
    assert result.observation() == "hello 42\nstderr:\nwarn"
    failed = run_python("raise SystemExit(3)", LIMITS)
    assert (failed.exit_code, failed.limit, failed.observation()) == (3, None, "[exit code 3]")


def test_sandbox_dir_is_fresh_each_run_and_deleted(sandbox_parent: Path) -> None:
    code = "import os\nprint(os.getcwd(), sorted(os.listdir('.')))\nopen('note.txt', 'w').write('run')"
    first, second = run_python(code, LIMITS), run_python(code, LIMITS)
    assert first.stdout == second.stdout == "/sandbox ['main.py']\n", (first, second)
    assert list(sandbox_parent.iterdir()) == []


@pytest.mark.parametrize("target", ["etc_passwd", "repo_file", "host_tmp_file"])
def test_host_files_are_not_readable(target: str, tmp_path: Path) -> None:
    host_file = tmp_path / "secret.txt"
    host_file.write_text("host secret\n")
    path = {"etc_passwd": Path("/etc/passwd"), "repo_file": REPO_ROOT / "pyproject.toml",
            "host_tmp_file": host_file}[target]
    code = f"import os\nprint(sorted(os.listdir('/')))\nprint(open({str(path)!r}).read())"
    assert unsandboxed(code).stdout.endswith(path.read_text() + "\n")
    result = run_python(code, LIMITS)
    visible = set(eval(result.stdout.splitlines()[0]))
    assert visible.isdisjoint({"etc", "tmp", "root", "work", "home", "var"}), visible
    assert result.stderr.rstrip().endswith(f"FileNotFoundError: [Errno 2] No such file or directory: '{path}'")
    assert path.read_text() not in result.stdout and result.exit_code == 1


def test_writes_outside_the_sandbox_dir_fail(tmp_path: Path) -> None:
    host_file = tmp_path / "escaped.txt"
    code = ("for path in PATHS:\n    try:\n        open(path, 'w').write('out')\n        print('wrote', path)\n"
            "    except OSError as error:\n        print(type(error).__name__, error.errno)")
    assert unsandboxed(code.replace("PATHS", repr([str(host_file)]))).stdout == f"wrote {host_file}\n"
    host_file.unlink()
    # /usr is bound read-only; the root and /dev are tmpfs, remounted read-only (host memory otherwise)
    paths = [str(host_file), "/usr/escaped.txt", "/escaped.txt", "/dev/shm/escaped.txt"]
    result = run_python(code.replace("PATHS", repr(paths)), LIMITS)
    assert result.stdout == "FileNotFoundError 2\nOSError 30\nOSError 30\nOSError 30\n", result  # EROFS
    assert not host_file.exists()


def test_socket_to_a_host_listener_fails_and_it_sees_nothing() -> None:
    code = ("import socket\ntry:\n    socket.create_connection(('127.0.0.1', PORT), timeout=2)\n"
            "    print('connected')\nexcept OSError as error:\n    print(type(error).__name__)")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        assert unsandboxed(code.replace("PORT", str(port))).stdout == "connected\n"
        listener.accept()[0].close()
        result = run_python(code.replace("PORT", str(port)), LIMITS)
        assert result.stdout == "ConnectionRefusedError\n", result
        with pytest.raises(TimeoutError):
            listener.accept()


def test_public_address_is_unreachable() -> None:
    code = ("import socket\nprint(socket.if_nameindex())\ntry:\n"
            "    socket.create_connection(('1.1.1.1', 80), timeout=2)\nexcept OSError as error:\n    print(error.errno)")
    assert unsandboxed("import socket\nprint(len(socket.if_nameindex()))").stdout != "1\n"  # the host has a network
    result = run_python(code, LIMITS)
    assert result.stdout == "[(1, 'lo')]\n101\n", result  # only loopback; ENETUNREACH: no route at all


def test_fork_bomb_is_stopped_by_the_process_limit() -> None:
    started = time.monotonic()
    result = run_python("import os\nwhile True:\n    os.fork()", LIMITS)
    assert result.limit == "processes" and result.exit_code == 1, result
    assert "[process limit hit: fork failed]" in result.observation()
    assert time.monotonic() - started < 5
    assert subprocess.run(["true"]).returncode == 0  # the machine still forks


@pytest.mark.parametrize(("processes", "limit"), [(16, "processes"), (64, None)])
def test_process_limit_counts_the_sandbox_processes(processes: int, limit: str | None) -> None:
    code = ("import os, time\nfor _ in range(24):\n    if os.fork() == 0:\n        time.sleep(1)\n        os._exit(0)\n"
            "print('forked 24')")
    result = run_python(code, LIMITS.model_copy(update={"processes": processes}))
    assert result.limit == limit, result
    assert (result.stdout == "forked 24\n") is (limit is None)


def test_threads_count_against_the_process_limit() -> None:
    code = "import threading\nthreading.Thread(target=print, args=('thread',)).start()"
    assert run_python(code, LIMITS.model_copy(update={"processes": 2})).limit == "processes"
    assert run_python(code, LIMITS.model_copy(update={"processes": 3})).stdout == "thread\n"


def test_no_process_outlives_the_run() -> None:
    marker = f"sandbox-daemon-{uuid.uuid4()}"
    code = ("import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)', "
            f"{marker!r}], start_new_session=True)\nprint('spawned')")

    control = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", marker])
    assert process_running(marker, wait_seconds=5)
    control.kill()
    control.wait()
    assert run_python(code, LIMITS).stdout == "spawned\n"
    assert not process_running(marker)


def test_an_interrupted_run_leaves_nothing_running() -> None:
    marker = f"sandbox-sleeper-{uuid.uuid4()}"
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(20)', {marker!r}])"

    def interrupt(signum: int, frame: object) -> None:
        assert process_running(marker)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_python(code, LIMITS)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 5 and not process_running(marker)


@pytest.mark.parametrize(("size_gib", "limit"), [(10, "memory"), (1 / 16, None)])
def test_allocation_is_stopped_by_the_memory_limit(size_gib: float, limit: str | None) -> None:
    result = run_python(f"data = bytearray(int({size_gib} * 2**30))\nprint(len(data))", LIMITS)
    assert result.limit == limit, result
    if limit:
        assert result.stderr.rstrip().endswith("MemoryError") and "[memory limit hit]" in result.observation()


def test_file_size_limit() -> None:
    code = "open('big', 'wb').write(bytes(2 * 2**20))\nprint('written')"
    assert run_python(code, LIMITS.model_copy(update={"file_mib": 1})).limit == "file"
    assert run_python(code, LIMITS.model_copy(update={"file_mib": 4})).stdout == "written\n"


def test_busy_loop_is_stopped_by_the_cpu_limit() -> None:
    started = time.monotonic()
    result = run_python("while True:\n    pass", LIMITS.model_copy(update={"cpu_seconds": 1}))
    assert result.limit == "cpu" and result.exit_code == 128 + 24, result  # SIGXCPU
    assert time.monotonic() - started < 5  # well before the 10 s wall limit


def test_sleeping_forever_is_stopped_by_the_wall_limit() -> None:
    started = time.monotonic()
    result = run_python("import time\ntime.sleep(1000)", LIMITS.model_copy(update={"wall_seconds": 1.0}))
    assert (result.limit, result.exit_code) == ("wall", None)
    assert 1 <= time.monotonic() - started < 4


@pytest.mark.parametrize("output_bytes", [16384, 8 * 2**20])
def test_unbounded_output_is_truncated_without_buffering_it(output_bytes: int) -> None:
    tracemalloc.start()
    started = time.monotonic()
    result = run_python("while True:\n    print('x' * 10**6)", LIMITS.model_copy(update={"output_bytes": output_bytes}))
    peak_bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert (result.limit, len(result.stdout), result.exit_code) == ("output", output_bytes, None)
    assert time.monotonic() - started < 5
    assert (peak_bytes < 2**20) is (output_bytes < 2**20), peak_bytes  # kept: output_bytes plus a read chunk


@pytest.mark.parametrize("user_namespaces", [False, True])
def test_refused_namespaces_raise_instead_of_running_unsandboxed(user_namespaces: bool, tmp_path: Path) -> None:
    """Inside an outer bubblewrap whose `--disable-userns` forbids new user namespaces."""
    host_file = tmp_path / "ran.txt"
    code = f"open({str(host_file)!r}, 'w')"
    script = ("from components.agents.sandbox import SandboxLimits, run_python\n"
              f"print(run_python({code!r}, SandboxLimits()).stderr)")
    outer = [shutil.which("bwrap"), "--unshare-user", "--uid", "1000", "--gid", "1000", "--dev-bind", "/", "/"]
    outer += [] if user_namespaces else ["--disable-userns"]
    done = subprocess.run([*outer, "--", sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=60)
    assert not host_file.exists()
    if user_namespaces:
        assert done.returncode == 0 and "FileNotFoundError" in done.stdout, done.stderr
    else:
        last_line = done.stderr.strip().splitlines()[-1]
        assert last_line.startswith("components.agents.sandbox.SandboxError: bubblewrap could not start"), last_line
        assert "Creating new namespace failed" in last_line


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError, match="memory_mib"):
        SandboxLimits(memory_mib=8)
    with pytest.raises(ValueError, match="wall_second"):
        SandboxLimits(wall_seconds=0)
