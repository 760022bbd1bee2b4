"""`crucible stack up|down|status`: a Prefect server and a process worker on this machine.

The stack is two processes we start and stop by pid: `prefect server start` (SQLite in the
state directory, loopback only unless an auth string is set) and `prefect worker start` on
the process work pool the deployments in `infra/prefect.yaml` use. Their pids, logs and the
API URL live in the state directory (`stack.json`); no secret is ever written there. For a
stack that survives this machine (Postgres, MinIO), see infra/docker-compose.yml.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import psutil

from components.errors import CrucibleError

DEFAULT_STATE_DIR = Path.home() / ".cache" / "crucible" / "stack"
DEFAULT_POOL = "crucible"
DEFAULT_PORT = 4200
STATE_FILE = "stack.json"
INFRA = Path(__file__).resolve().parent.parent / "infra"
PREFECT_FILE = INFRA / "prefect.yaml"
AUTOMATIONS_FILE = INFRA / "automations.yaml"
SERVER_AUTH_ENV = "PREFECT_SERVER_API_AUTH_STRING"
CLIENT_AUTH_ENV = "PREFECT_API_AUTH_STRING"


class StackError(CrucibleError):
    """The local stack could not be started, reached or stopped."""


@dataclass(frozen=True)
class StackState:
    api_url: str
    host: str
    port: int
    pool: str
    server_pid: int
    worker_pid: int  # 0: none started yet
    server_started: float  # process creation times: a recycled pid is never taken for ours
    worker_started: float
    server_log: str
    worker_log: str
    database: str


def _prefect() -> str:
    return str(Path(sys.executable).with_name("prefect"))


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _started_at(pid: int) -> float:
    return psutil.Process(pid).create_time()


def _alive(pid: int, started: float) -> bool:
    """Whether the process we started as `pid` (created at `started`) still runs."""
    if pid <= 0:
        return False
    try:
        process = psutil.Process(pid)
        return process.create_time() == started and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def client_env(api_url: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a Prefect client of this stack needs: the API URL and, when the server
    requires basic auth, the same credentials on the client side (from the environment only)."""
    env = dict(os.environ if base is None else base)
    env["PREFECT_API_URL"] = api_url
    if env.get(SERVER_AUTH_ENV) and not env.get(CLIENT_AUTH_ENV):
        env[CLIENT_AUTH_ENV] = env[SERVER_AUTH_ENV]
    return env


def _env(state_dir: Path, api_url: str) -> dict[str, str]:
    """The environment of the stack's processes: a client's, with its own Prefect home."""
    env = client_env(api_url)
    env.setdefault("PREFECT_HOME", str(state_dir / "home"))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return env


def read_state(state_dir: Path) -> StackState | None:
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    return StackState(**json.loads(path.read_text(encoding="utf-8")))


def _wait_healthy(api_url: str, pid: int, started: float, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(pid, started):
            raise StackError(f"the Prefect server exited during start-up; see {log}:\n{_tail(log)}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise StackError(f"the Prefect server at {api_url} was not healthy after {timeout_s:.0f} s; see {log}")


def _tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> int:
    """Start a process in its own session (so `down` can stop it and its children by its id)."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True, stdin=subprocess.DEVNULL)
    return process.pid


def _run_prefect(args: list[str], env: dict[str, str], cwd: Path, what: str) -> str:
    result = subprocess.run([_prefect(), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise StackError(f"{what} failed (prefect {' '.join(args)}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout


def up(state_dir: Path = DEFAULT_STATE_DIR, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
       pool: str = DEFAULT_POOL, deploy: bool = False, project_dir: Path | None = None,
       startup_timeout_s: float = 180) -> StackState:
    """Start the server and a worker (or return the running stack, restarting a dead worker),
    create the work pool and, with `deploy`, every deployment of infra/prefect.yaml and the
    automations of infra/automations.yaml."""
    state_dir = state_dir.absolute()
    project_dir = (project_dir or Path.cwd()).absolute()
    state = read_state(state_dir)
    if state is not None and not _alive(state.server_pid, state.server_started):
        down(state_dir)
        state = None
    if state is None:
        state = _start_server(state_dir, host, port, pool, startup_timeout_s)
    env = _env(state_dir, state.api_url)
    try:
        if not _alive(state.worker_pid, state.worker_started):
            _ensure_pool(state, env)
            state = _start_worker(state, state_dir, env, project_dir)
        if deploy:
            _run_prefect(["deploy", "--all", "--prefect-file", str(PREFECT_FILE), "--no-prompt"], env, project_dir,
                         "deploying infra/prefect.yaml")
            _ensure_automations(state, env, project_dir)
    except BaseException:
        _stop(state.worker_pid, state.worker_started)
        _stop(state.server_pid, state.server_started)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return state


def _start_server(state_dir: Path, host: str, port: int, pool: str, startup_timeout_s: float) -> StackState:
    if not _is_loopback(host) and not os.environ.get(SERVER_AUTH_ENV):
        raise StackError(f"refusing to serve the Prefect API on {host} without authentication: "
                         f"set {SERVER_AUTH_ENV}=user:password (and {CLIENT_AUTH_ENV} on clients) or bind 127.0.0.1")
    state_dir.mkdir(parents=True, exist_ok=True)
    port = port or _free_port(host)
    api_url = f"http://{host}:{port}/api"
    database = state_dir / "prefect.db"
    server_log = state_dir / "server.log"
    server_env = {**_env(state_dir, api_url), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
                  "PREFECT_SERVER_API_HOST": host, "PREFECT_SERVER_API_PORT": str(port)}
    server_env.pop("PREFECT_API_URL")  # the server is not a client of itself
    server_pid = _spawn([_prefect(), "server", "start", "--host", host, "--port", str(port)],
                        server_log, server_env, state_dir)
    state = StackState(api_url=api_url, host=host, port=port, pool=pool, server_pid=server_pid, worker_pid=0,
                       server_started=_started_at(server_pid), worker_started=0.0, server_log=str(server_log),
                       worker_log=str(state_dir / "worker.log"), database=str(database))
    _write_state(state, state_dir)
    try:
        _wait_healthy(api_url, server_pid, state.server_started, server_log, startup_timeout_s)
    except BaseException:
        _stop(server_pid, state.server_started)
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        raise
    return state


def _client(state: StackState, env: dict[str, str]):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=state.api_url, auth_string=env.get(CLIENT_AUTH_ENV))


def _ensure_pool(state: StackState, env: dict[str, str]) -> None:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with _client(state, env) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=state.pool, type="process"))
        except ObjectAlreadyExists:
            pass


def _ensure_automations(state: StackState, env: dict[str, str], project_dir: Path) -> None:
    import yaml

    wanted = [a["name"] for a in yaml.safe_load(AUTOMATIONS_FILE.read_text(encoding="utf-8"))["automations"]]
    with _client(state, env) as client:
        missing = [name for name in wanted if not client.read_automations_by_name(name)]
    if missing:  # the file holds them all; it is created whole, once
        _run_prefect(["automation", "create", "--from-file", str(AUTOMATIONS_FILE)], env, project_dir,
                     "creating infra/automations.yaml")


def _write_state(state: StackState, state_dir: Path) -> None:
    (state_dir / STATE_FILE).write_text(json.dumps(asdict(state), indent=2) + "\n", encoding="utf-8")


def _start_worker(state: StackState, state_dir: Path, env: dict[str, str], project_dir: Path) -> StackState:
    worker_pid = _spawn([_prefect(), "worker", "start", "--pool", state.pool, "--type", "process", "--name",
                         f"{state.pool}-local"], Path(state.worker_log), env, project_dir)
    state = StackState(**{**asdict(state), "worker_pid": worker_pid, "worker_started": _started_at(worker_pid)})
    _write_state(state, state_dir)
    return state


def _stop(pid: int, started: float, timeout_s: float = 20) -> None:
    """SIGTERM the process we started and every process under it, then SIGKILL what is left.
    Only a process whose creation time matches is touched: never a recycled pid."""
    if not _alive(pid, started):
        return
    leader = psutil.Process(pid)
    processes = [leader, *leader.children(recursive=True)]
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout_s)


def down(state_dir: Path = DEFAULT_STATE_DIR) -> StackState | None:
    """Stop the worker, then the server; keeps the database and logs for the next `up`."""
    state_dir = state_dir.absolute()
    state = read_state(state_dir)
    if state is None:
        return None
    _stop(state.worker_pid, state.worker_started)
    _stop(state.server_pid, state.server_started)
    (state_dir / STATE_FILE).unlink()
    return state


def status(state_dir: Path = DEFAULT_STATE_DIR) -> str:
    state = read_state(state_dir.absolute())
    if state is None:
        return f"no stack in {state_dir}"
    server = "running" if _alive(state.server_pid, state.server_started) else "stopped"
    worker = "running" if _alive(state.worker_pid, state.worker_started) else "stopped"
    return (f"server {server} (pid {state.server_pid}) at {state.api_url}, log {state.server_log}\n"
            f"worker {worker} (pid {state.worker_pid}) on pool {state.pool}, log {state.worker_log}")
