"""The Python sandbox tool: run untrusted code under bubblewrap with resource limits.

Invariant: the code runs only inside fresh user, network, pid, ipc, uts and cgroup namespaces
whose only writable host directory is a new empty one, deleted afterwards; when bubblewrap
cannot build that sandbox, `run_python` raises `SandboxError` and never runs the code otherwise.

Inside: the system python3 (`/usr/bin/python3`, not the repo's venv) in isolated mode, /usr and
its /bin, /lib* links read-only, `--proc /proc`, `--dev /dev`, the fresh directory at
/sandbox (working directory, HOME, TMPDIR); no /etc, /tmp, /root, /work of the host. The root
and /dev tmpfs are remounted read-only: a tmpfs would hold files in host memory outside
RLIMIT_AS. The network namespace has only a loopback nobody listens on.

Limits (setrlimit(2), set by a bootstrap inside the sandbox, then exec of the user's code):
RLIMIT_CPU (SIGXCPU, SIGKILL a second later), RLIMIT_AS, RLIMIT_NPROC, RLIMIT_FSIZE, no core
files. Wall time and output are enforced here: the run is killed through the sandbox's pid
namespace init, and `run_python` returns only once every sandboxed process is gone (an
interrupted caller kills it the same way; `--die-with-parent` covers a caller that dies). Output
is read in chunks and the run killed once a stream passes `output_bytes`, so the parent never
buffers more than that. RLIMIT_NPROC is set after bubblewrap made the user namespace so that
it counts the sandbox's own processes (a namespace's count is checked against the limit its
creator had, kernel/ucount.c `is_rlimit_overlimit`); the kernel never applies it to a real
uid 0 (kernel/fork.c `copy_process`), user namespace or not (measured: 200 forks pass), so a
root caller runs the sandbox as `nobody`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from components.config import StrictConfig
from components.errors import CrucibleError

SANDBOX_DIR = "/sandbox"
PYTHON_CANDIDATES = ("/usr/bin/python3", "/usr/local/bin/python3")  # under /usr: bound read-only
READ_CHUNK_BYTES = 65536
STDERR_TAIL_CHARS = 2000  # of stderr in an observation: a traceback's end names the error
LIMIT_MESSAGES = {
    "cpu": "CPU time limit hit: killed",
    "memory": "memory limit hit",
    "processes": "process limit hit: fork failed",
    "file": "file size limit hit",
    "output": "output limit hit: truncated and killed",
    "wall": "wall time limit hit: killed",
}
RLIMIT_ERRORS = {  # limit: how Python reports hitting it (the start of a traceback's last line)
    "memory": ("MemoryError",),
    "processes": ("BlockingIOError: [Errno 11]", "OSError: [Errno 11]", "RuntimeError: can't start new thread"),
    "file": ("OSError: [Errno 27]",),
}
# Runs first inside the sandbox: argv = marker fd, then "NAME:soft:hard" rlimits. Writes the
# marker (the sandbox is up), closes it, and execs the user's code with the limits in place.
BOOTSTRAP = """
import os, resource, sys
for spec in sys.argv[2:]:
    name, soft, hard = spec.split(":")
    limit = getattr(resource, name)
    ceiling = resource.getrlimit(limit)[1]
    soft, hard = ((int(v) if ceiling == resource.RLIM_INFINITY else min(int(v), ceiling)) for v in (soft, hard))
    resource.setrlimit(limit, (soft, hard))
os.write(int(sys.argv[1]), b"up")
os.close(int(sys.argv[1]))
os.execv(sys.executable, [sys.executable, "-I", "main.py"])
"""


class SandboxError(CrucibleError):
    """The sandbox cannot be built on this machine (bubblewrap missing, namespaces refused)."""


class SandboxLimits(StrictConfig):
    cpu_seconds: int = Field(5, ge=1, le=3600, description="CPU time per process (RLIMIT_CPU).")
    memory_mib: int = Field(256, ge=64, le=1 << 20, description=(
        "Address space per process (RLIMIT_AS); python3 itself needs about 20 MiB."))
    processes: int = Field(16, ge=1, le=4096, description=(
        "Processes and threads in the sandbox at once (RLIMIT_NPROC), bubblewrap's init included."))
    file_mib: int = Field(64, ge=0, le=1 << 20, description="Size of any file the code writes (RLIMIT_FSIZE).")
    output_bytes: int = Field(16384, ge=1, le=1 << 26, description=(
        "Bytes kept of stdout and of stderr each; a run writing more is killed."))
    wall_seconds: float = Field(10.0, gt=0, le=3600, description="Wall time of a run; then it is killed.")


@dataclass(frozen=True)
class SandboxResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None when killed here (wall, output); 128 + N when signal N ended it
    limit: str | None  # a key of LIMIT_MESSAGES, or None

    def observation(self) -> str:
        """What the agent sees: stdout, the tail of stderr, and the limit hit or a non-zero exit."""
        parts = [self.stdout.rstrip("\n")] if self.stdout.strip() else []
        if self.stderr.strip():
            parts.append("stderr:\n" + self.stderr.rstrip()[-STDERR_TAIL_CHARS:])
        if self.limit:
            parts.append(f"[{LIMIT_MESSAGES[self.limit]}]")
        elif self.exit_code:
            parts.append(f"[exit code {self.exit_code}]")
        return "\n".join(parts) or "(no output)"


def run_python(code: str, limits: SandboxLimits) -> SandboxResult:
    """Run `code` as /sandbox/main.py in a fresh sandbox; see the module docstring."""
    user = _unprivileged_user()
    directory = tempfile.mkdtemp(prefix="crucible-sandbox-")
    (marker_read, marker_write), (info_read, info_write) = os.pipe(), os.pipe()
    open_fds = [marker_read, marker_write, info_read, info_write]
    try:
        Path(directory, "main.py").write_text(code, encoding="utf-8")
        if user is not None:
            os.chown(directory, user, user)
        process = _start(directory, limits, user, marker_write, info_write)
        for fd in (marker_write, info_write):
            os.close(fd)
            open_fds.remove(fd)
        with process:
            try:
                stdout, stderr, killed_for = _collect(process, limits)
            finally:  # a limit hit, or an interrupted caller: nothing of the sandbox may outlive the call
                if process.poll() is None:
                    _kill(process, info_read)
        started = _read_marker(marker_read)
    finally:
        for fd in open_fds:
            os.close(fd)
        _remove_tree(directory)
    if not started and killed_for is None:
        raise SandboxError(_startup_failure(stderr))
    exit_code = None if killed_for else process.returncode
    return SandboxResult(stdout, stderr, exit_code, killed_for or _limit_from_exit(exit_code, stderr))


def _start(directory: str, limits: SandboxLimits, user: int | None, marker_fd: int, info_fd: int) -> subprocess.Popen:
    """bubblewrap running the bootstrap, in its own process group, as `user` (None: as we are)."""
    command = [*_bwrap_command(directory), "--info-fd", str(info_fd), "--", _interpreter(), "-I", "-S", "-c",
               BOOTSTRAP, str(marker_fd), *_rlimit_specs(limits)]
    return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=(marker_fd, info_fd), start_new_session=True, user=user, group=user,
                            extra_groups=[] if user is not None else None)


def _bwrap_command(directory: str) -> list[str]:
    """bubblewrap's options for a sandbox with nothing of the host but /usr (read-only) and
    `directory` (writable, at /sandbox)."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("bubblewrap (`bwrap`) is not installed: run `make install` "
                           "(or `apt-get install bubblewrap`); the Python tool never runs code unsandboxed")
    command = [bwrap, "--unshare-all", "--unshare-user", "--unshare-cgroup", "--disable-userns",
               "--die-with-parent", "--new-session", "--clearenv", "--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/", name)
        if path.is_symlink():
            command += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            command += ["--ro-bind", str(path), str(path)]
    command += ["--proc", "/proc", "--dev", "/dev", "--bind", directory, SANDBOX_DIR, "--remount-ro", "/dev",
                "--remount-ro", "/",
                "--chdir", SANDBOX_DIR, "--hostname", "sandbox"]
    for name, value in (("HOME", SANDBOX_DIR), ("TMPDIR", SANDBOX_DIR), ("PATH", "/usr/bin:/bin"),
                        ("LANG", "C.UTF-8"), ("PYTHONDONTWRITEBYTECODE", "1")):
        command += ["--setenv", name, value]
    return command


def _interpreter() -> str:
    for path in PYTHON_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    raise SandboxError(f"no system python3 for the sandbox: none of {', '.join(PYTHON_CANDIDATES)} exists")


def _unprivileged_user() -> int | None:
    """The uid (and gid) to run bubblewrap as: `nobody` for a root caller, else None (as is)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("nobody").pw_uid
    except KeyError:
        return 65534


def _rlimit_specs(limits: SandboxLimits) -> list[str]:
    memory_bytes, file_bytes = limits.memory_mib << 20, limits.file_mib << 20
    return [f"RLIMIT_CPU:{limits.cpu_seconds}:{limits.cpu_seconds + 1}", f"RLIMIT_AS:{memory_bytes}:{memory_bytes}",
            f"RLIMIT_NPROC:{limits.processes}:{limits.processes}", f"RLIMIT_FSIZE:{file_bytes}:{file_bytes}",
            "RLIMIT_CORE:0:0"]


def _collect(process: subprocess.Popen, limits: SandboxLimits) -> tuple[str, str, str | None]:
    """(stdout, stderr, "wall" | "output" | None): read both pipes until they close and the
    process exits; stop at the wall-time deadline or once a stream passes output_bytes (the
    caller then kills the run)."""
    deadline = time.monotonic() + limits.wall_seconds
    buffers = {process.stdout.fileno(): bytearray(), process.stderr.fileno(): bytearray()}
    killed_for = None
    with selectors.DefaultSelector() as selector:
        for fd in buffers:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and killed_for is None:
            ready = selector.select(max(deadline - time.monotonic(), 0))
            killed_for = "wall" if not ready else None
            for key, _ in ready:
                chunk = os.read(key.fd, READ_CHUNK_BYTES)
                buffers[key.fd] += chunk
                if not chunk:
                    selector.unregister(key.fd)
                elif len(buffers[key.fd]) > limits.output_bytes:
                    del buffers[key.fd][limits.output_bytes:]
                    killed_for = "output"
    if killed_for is None:
        try:
            process.wait(max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            killed_for = "wall"
    stdout, stderr = (bytes(buffer).decode("utf-8", errors="replace") for buffer in buffers.values())
    return stdout, stderr, killed_for


def _kill(process: subprocess.Popen, info_fd: int) -> None:
    """SIGKILL the sandbox's init (bubblewrap's pid 1, named on --info-fd) and wait for bubblewrap:
    an init's exit waits for every process of its pid namespace (kernel/pid_namespace.c
    `zap_pid_ns_processes`), so nothing of the sandbox is left. Before the init exists, the
    process group."""
    init = _sandbox_init(info_fd)
    if init is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    else:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(init, signal.SIGKILL)
        os.close(init)
    process.wait()


def _sandbox_init(info_fd: int) -> int | None:
    """A pidfd of the sandbox's init, from bubblewrap's --info-fd JSON ({"child-pid": N, ...})."""
    os.set_blocking(info_fd, False)
    try:
        return os.pidfd_open(json.loads(os.read(info_fd, 4096))["child-pid"])
    except (BlockingIOError, ProcessLookupError, ValueError, KeyError):
        return None


def _read_marker(fd: int) -> bool:
    """Whether the bootstrap ran inside the sandbox (wrote to the marker pipe)."""
    os.set_blocking(fd, False)
    try:
        return os.read(fd, 16) == b"up"
    except BlockingIOError:
        return False


def _limit_from_exit(exit_code: int, stderr: str) -> str | None:
    """The rlimit that ended the run, from how it ended: SIGXCPU, or SIGKILL (only the hard
    RLIMIT_CPU sends one inside), or a failed run whose stderr holds the exception Python raised
    (MemoryError for RLIMIT_AS, EAGAIN from fork or no new thread for RLIMIT_NPROC, EFBIG for RLIMIT_FSIZE: Python
    ignores SIGXFSZ). Any line, not the last: a fork bomb's processes interleave their tracebacks."""
    if exit_code in (128 + signal.SIGXCPU, 128 + signal.SIGKILL):
        return "cpu"
    lines = stderr.splitlines() if exit_code else []
    for limit, error_prefixes in RLIMIT_ERRORS.items():
        if any(line.startswith(error_prefixes) for line in lines):
            return limit
    return None


def _startup_failure(stderr: str) -> str:
    cause = stderr.strip().splitlines()[-1] if stderr.strip() else "no message"
    return (f"bubblewrap could not start the Python sandbox ({cause}); the code was not run. If user "
            "namespaces are disabled, allow them: sysctl user.max_user_namespaces, "
            "kernel.unprivileged_userns_clone, or kernel.apparmor_restrict_unprivileged_userns=0 (Ubuntu 24.04)")


def _remove_tree(directory: str) -> None:
    """Delete the sandbox directory, whatever modes the code left on its subdirectories."""
    for root, names, _ in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o700)
    shutil.rmtree(directory)
