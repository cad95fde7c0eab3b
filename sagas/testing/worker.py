"""Real Celery workers for tests, drills and benchmarks: `celery -A <app> worker` processes.

A saga's guarantees live in what a worker does (prefork processes, acknowledgements after the
task, error callbacks sent as messages, soft and hard time limits), so the test kit runs the
user's own worker command, never an eager or in-process imitation of one.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

from celery import Celery, current_app

T = TypeVar("T")

BOOT_MODULE = "sagas.testing.boot"

# The framework's tasks: wherever the app's `task_routes` send them, the kit's worker takes them.
SAGA_TASKS = (
    "sagas.run_step",
    "sagas.compensate_step",
    "sagas.on_step_failure",
    "sagas.on_compensation_failure",
    "sagas.chain_failed",
    "sagas.bulk_action_batch",
    "sagas.child_ended",
    "sagas.repair",
    "sagas.sweep",
    "sagas.wake",
    "sagas.purge",
)


def wait_for(
    condition: Callable[[], T], *, timeout: float = 30, what: str = "condition", interval=0.05
) -> T:
    """Poll `condition` until it returns something truthy, and return that; fail (an
    AssertionError) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def test_database_env() -> dict[str, str]:
    """Environment for a worker that must use this process's test databases.

    Call it once the test databases exist (in pytest-django, after `django_db_setup`). The
    worker keeps its settings' server and credentials and takes each alias's test name.
    """
    from django.db import connections

    names = {alias: connections[alias].settings_dict["NAME"] for alias in connections}
    return {"SAGAS_TESTING_DATABASES": json.dumps(names)}


test_database_env.__test__ = False  # type: ignore[attr-defined]  # not a test, for pytest


class CeleryWorker:
    """Worker nodes of a Celery app, each a `celery -A <app> worker` process.

        with CeleryWorker("proj", queue="test-orders", concurrency=2, env=...) as worker:
            ...

    With `queue`, the nodes listen on that queue alone, and every task they send goes to it,
    whatever the app's `task_routes` say; within `routed()`, so does every task this process
    sends. A test run's messages then stay on a queue of its own, out of reach of any other
    worker on the same broker (one on the project's routed queues would run them on its own
    database). Without `queue`, the nodes listen where a worker of the project must: on the
    app's default queue and on every queue its `task_routes` send a saga task to (`queues()`).

    `nodes`: how many nodes, or their names (each runs as `<name>@<host>`); counted nodes
    are named `<name><i>-<queue>`. `env` is added to this process's environment. `log`: a
    file per node, a path that may hold `{node}` and `{index}`; without it a node writes to
    this process's output. `include`: more modules for the worker to import.
    `without`: the worker features to turn off (`--without-gossip`, ...).

    `start()` waits until every node takes messages (at most `ready_timeout` seconds) and
    fails with the end of its log if one exits first; `stop()` ends them (SIGTERM: a warm
    shutdown), then kills what is left after `stop_timeout` seconds.
    """

    def __init__(
        self,
        app: str,
        *,
        queue: str | None = None,
        nodes: int | Sequence[str] = 1,
        name: str = "worker",
        concurrency: int = 1,
        env: Mapping[str, str] | None = None,
        log: str | Path | None = None,
        loglevel: str = "info",
        include: Sequence[str] = (),
        without: Sequence[str] = ("gossip", "mingle", "heartbeat"),
        args: Sequence[str] = (),
        cwd: str | Path | None = None,
        ready_timeout: float = 60.0,
        stop_timeout: float = 20.0,
    ) -> None:
        self.app, self.queue, self.concurrency = app, queue, concurrency
        if isinstance(nodes, int):
            suffix = f"-{queue}" if queue else ""
            nodes = [f"{name}{i}{suffix}" for i in range(nodes)]
        self.nodes = list(nodes)
        self.env, self.log, self.loglevel = dict(env or {}), log, loglevel
        self.include, self.without, self.args = list(include), list(without), list(args)
        self.cwd, self.ready_timeout, self.stop_timeout = cwd, ready_timeout, stop_timeout
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._ready_folder = Path(tempfile.mkdtemp(prefix="sagas-worker-"))
        self._outputs: list[IO[Any]] = []

    # -- what runs ---------------------------------------------------------------------------

    @property
    def node_names(self) -> list[str]:
        """The nodes' full names (`<name>@<host>`), as remote control addresses them."""
        host = socket.gethostname()
        return [f"{node}@{host}" for node in self.nodes]

    @property
    def procs(self) -> list[subprocess.Popen[bytes]]:
        """The nodes' main processes, in the order of `nodes`."""
        return [self.processes[node] for node in self.nodes if node in self.processes]

    @property
    def logs(self) -> list[Path]:
        return [p for p in (self.log_of(node) for node in self.nodes) if p is not None]

    def log_of(self, node: str) -> Path | None:
        if self.log is None:
            return None
        return Path(str(self.log).format(node=node, index=self.nodes.index(node)))

    def command(self, node: str) -> list[str]:
        cmd = [sys.executable, "-m", "celery", "-A", self.app, "worker"]
        if self.queue:
            cmd += ["-Q", self.queue]
        cmd += ["-c", str(self.concurrency), "-n", f"{node}@%h"]
        cmd += ["--include", ",".join([*self.include, BOOT_MODULE])]
        cmd += [f"--without-{feature}" for feature in self.without]
        return [*cmd, "-l", self.loglevel, *self.args]

    # -- starting and stopping ---------------------------------------------------------------

    def start(self) -> CeleryWorker:
        for node in self.nodes:
            self.start_node(node, fresh_log=True)
        self.wait_ready()
        return self

    def start_node(self, node: str, *, fresh_log: bool = False) -> subprocess.Popen[bytes]:
        """Start one node (again): a supervisor's restart appends to its log."""
        ready = self._ready_file(node)
        ready.unlink(missing_ok=True)
        env = {**os.environ, **self.env, "SAGAS_TESTING_READY_FILE": str(ready)}
        if self.queue:
            env["SAGAS_TESTING_QUEUE"] = self.queue
        output: IO[Any] | None = None
        log = self.log_of(node)
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            output = log.open("w" if fresh_log else "a")
            self._outputs.append(output)
        self.processes[node] = subprocess.Popen(
            self.command(node),
            cwd=self.cwd,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
        return self.processes[node]

    def wait_ready(self) -> None:
        wait_for(self.ready, timeout=self.ready_timeout, what=f"Celery worker {self.nodes}")

    def ready(self) -> bool:
        """Every node takes messages; raises if one has exited."""
        for node, proc in self.processes.items():
            if proc.poll() is not None:
                log = self.log_of(node)
                tail = log.read_text()[-3000:] if log is not None else "(its output is above)"
                raise RuntimeError(f"worker {node} exited ({proc.returncode}); {log}:\n{tail}")
        return all(self._ready_file(node).exists() for node in self.nodes)

    def stop(self) -> None:
        for proc in self.processes.values():
            proc.terminate()
        for proc in self.processes.values():
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for output in self._outputs:
            output.close()
        self._outputs.clear()
        shutil.rmtree(self._ready_folder, ignore_errors=True)

    def __enter__(self) -> CeleryWorker:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _ready_file(self, node: str) -> Path:
        return self._ready_folder / f"{node}.ready"

    # -- the queue -------------------------------------------------------------------------

    def queues(self, app: Celery | None = None) -> list[str]:
        """The queues the nodes listen on: `queue`, or else the app's default queue and every
        queue its `task_routes` send a saga task to (`saga_queues`)."""
        return [self.queue] if self.queue else saga_queues(app or current_app)

    @contextmanager
    def routed(self, app: Celery | None = None) -> Iterator[None]:
        """Within it, every task this process sends goes to this worker's queue, whatever the
        app's `task_routes` say (`send_everything_to`). Without a queue of the worker's own it
        changes nothing: the tasks follow the app's routes, to queues the worker listens on."""
        undo = send_everything_to(app or current_app, self.queue) if self.queue else None
        try:
            yield
        finally:
            if undo is not None:
                undo()

    def purge(self, app: Celery | None = None) -> None:
        """Drop the messages waiting in this worker's queue."""
        if self.queue:
            with (app or current_app).connection_for_write() as conn:
                channel: Any = conn.default_channel
                channel.queue_purge(self.queue)

    def wait_idle(
        self, saga_id: object = None, *, timeout: float = 30, app: Celery | None = None
    ) -> None:
        """Wait until nothing waits in the queue and no node holds a message (running,
        prefetched or scheduled for later) of `saga_id` (of any saga, without one)."""
        app = app or current_app
        wait_idle(app, self.queues(app), self.node_names, saga_id, timeout=timeout)


def default_queue(app: Celery) -> str:
    return str(app.conf.task_default_queue)


def saga_queues(app: Celery) -> list[str]:
    """The queues a worker of `app` must listen on to run sagas: the app's default queue, then
    every queue its router (Celery's `task_routes`) sends one of `SAGA_TASKS` to, by the task's
    name. A route that names no queue (only an exchange and a routing key) adds none."""
    queues = [default_queue(app)]
    for task in SAGA_TASKS:
        queue = app.amqp.router.route({}, task).get("queue")
        name = str(getattr(queue, "name", queue) or "")
        if name and name not in queues:
            queues.append(name)
    return queues


def send_everything_to(app: Celery, queue: str) -> Callable[[], None]:
    """Send every task `app` sends from this process to `queue`, whatever its `task_routes`
    say: `queue` becomes the default queue, and a route to it goes first, ahead of the app's.
    (A queue given when a task is sent still wins, as it does over any route.) Returns what
    undoes it."""

    def to_queue(name: str, *args: Any, **kwargs: Any) -> dict[str, str]:
        return {"queue": queue}

    router: Any = app.amqp.router  # (its `routes`, the prepared `task_routes`, are untyped)
    before = app.conf.task_default_queue
    app.conf.task_default_queue = queue
    router.routes = [to_queue, *router.routes]

    def undo() -> None:
        router.routes = [route for route in router.routes if route is not to_queue]
        app.conf.task_default_queue = before

    return undo


def queue_length(app: Celery, queue: str) -> int:
    with app.connection_for_write() as conn:
        channel: Any = conn.default_channel
        try:
            return int(channel.queue_declare(queue=queue, passive=True).message_count)
        except conn.channel_errors:  # no such queue: nothing was ever sent to it
            return 0


def is_idle(
    app: Celery, *, queue: str | Sequence[str], nodes: list[str] | None, saga_id: object = None
) -> bool:
    """Nothing in `queue` (or in any of the queues), then no message of `saga_id` held by a
    worker, then still nothing in them (a task may have sent one as it finished between the
    two looks)."""
    queues = [queue] if isinstance(queue, str) else list(queue)

    def waiting() -> int:
        return sum(queue_length(app, name) for name in queues)

    if waiting():
        return False
    inspect = app.control.inspect(
        destination=nodes, timeout=1.0, limit=len(nodes) if nodes else None
    )
    for held in (inspect.active, inspect.reserved, inspect.scheduled):
        replies = held() or {}
        if nodes and set(replies) != set(nodes):
            return False  # a node did not answer: it may be holding one
        wanted = "" if saga_id is None else str(saga_id)
        if any(tasks and wanted in repr(tasks) for tasks in replies.values()):
            return False
    return waiting() == 0


def wait_idle(
    app: Celery,
    queue: str | Sequence[str] | None,
    nodes: list[str] | None,
    saga_id: object = None,
    *,
    timeout: float = 30,
) -> None:
    """Wait until `is_idle` holds twice in a row (a message in flight between a worker's
    two processes, or on its way to the broker, is seen by one of the looks). Without `queue`,
    on the queues a worker of the app listens on (`saga_queues`)."""
    queues = queue or saga_queues(app)

    def twice() -> bool:
        return is_idle(app, queue=queues, nodes=nodes, saga_id=saga_id) and is_idle(
            app, queue=queues, nodes=nodes, saga_id=saga_id
        )

    wait_for(twice, timeout=timeout, what=f"the workers to finish with saga {saga_id}")
