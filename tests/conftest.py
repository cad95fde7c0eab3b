"""Fixtures: real Celery worker processes on the test database and the real broker."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import pytest
from django.conf import settings

from sagaproject.celery import app as celery_app
from sagas import definitions
from sagas.testing.worker import CeleryWorker, wait_for
from tests import sagadefs  # noqa: F401  (registers the test sagas in this process too)

# The test kit's fixtures: `saga_worker` starts the suite's workers (`saga_worker_options`);
# pytester runs pytest on a test of its own (tests/test_testkit.py).
pytest_plugins = ["sagas.testing.pytest_plugin", "pytester"]

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
# A queue of this run's own, so no other worker on the same Redis takes the tests' messages.
QUEUE = f"test-sagas-{uuid.uuid4().hex[:8]}"
FINAL = {"completed", "compensated", "failed"}
# A shipping address the order tests share.
ADDRESS = {
    "name": "Ada Lovelace",
    "line1": "12 St James's Square",
    "city": "London",
    "postal_code": "SW1Y 4JH",
    "country": "GB",
}


# The system tier: tests that run worker processes (the session's, or their own), servers,
# a browser, fresh projects from the wheel, or pytest itself. `make check` runs the others, the
# fast loop; `make test` runs both.
SYSTEM_FIXTURES = {"workers", "saga_worker", "saga_db", "pytester"}
SYSTEM_MODULES = {
    "test_adoption",
    "test_api_fuzz",
    "test_browser",
    "test_database_outage",
    "test_drill",
    "test_embedded",
    "test_engine_stateful",
    "test_production",
    "test_redis_restart",
    "test_stack",
    "test_testkit",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")
        if module in SYSTEM_MODULES or SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.system)


def pytest_configure(config: pytest.Config) -> None:
    from django.test import TransactionTestCase

    TransactionTestCase._fixture_teardown = _quiet_then_flush(  # type: ignore[method-assign]
        TransactionTestCase._fixture_teardown
    )
    settings.CELERY_TASK_DEFAULT_QUEUE = QUEUE
    celery_app.conf.task_default_queue = QUEUE
    settings.SAGAS_HARD_TIME_LIMIT_GRACE = 2  # as in the workers (worker_env)
    # WhiteNoise warns at every request when the static folder does not exist.
    Path(settings.STATIC_ROOT).mkdir(parents=True, exist_ok=True)
    # The manifest storage needs `collectstatic`, which tests do not run (as Django's docs say
    # of ManifestStaticFilesStorage); test_production runs it, then a server, DEBUG off.
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


def database_url(settings_dict: dict) -> str:
    """A URL for the (test) database Django is using, to hand to worker processes."""
    user = quote(settings_dict["USER"] or "")
    password = quote(settings_dict["PASSWORD"] or "")
    name = settings_dict["NAME"]
    host = settings_dict["HOST"] or settings_dict.get("OPTIONS", {}).get("host", "")
    if host.startswith("/"):  # a Unix socket folder (the embedded server)
        return f"postgresql://{user}:{password}@/{name}?host={host}"
    return f"postgresql://{user}:{password}@{host}:{settings_dict['PORT'] or 5432}/{name}"


def worker_env() -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
        "CELERY_TASK_DEFAULT_QUEUE": QUEUE,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "SAGAS_MODULES": "tests.sagadefs",
        "PYTHONUNBUFFERED": "1",
        # A hung step is killed 2 s after its soft time limit (tests/test_failure_paths.py).
        "SAGAS_HARD_TIME_LIMIT_GRACE": "2",
    }


def worker_options(
    nodes: int, concurrency: int, *, name: str = "worker", env: dict | None = None
) -> dict:
    """Real `celery worker` processes (prefork) of the project on the suite's queue, each
    logging to test-artifacts/<name>-<i>.log: the test kit's `CeleryWorker` arguments."""
    return {
        "app": "sagaproject",
        "queue": QUEUE,
        "nodes": nodes,
        "name": name,
        "concurrency": concurrency,
        "env": {**worker_env(), **(env or {})},  # `env`: overrides, e.g. another broker
        "log": ARTIFACTS / f"{name}-{{index}}.log",
        "cwd": ROOT,
    }


@pytest.fixture(scope="session")
def worker_metrics(tmp_path_factory) -> dict:
    """Where the suite's workers keep their metrics: the directory of prometheus-client's
    multiprocess mode, which their pool processes write to, and the URL at which a node's main
    process serves it (sagas.metrics.worker). Both nodes share them: the node that takes the
    port serves the other's files too, and the other logs that the port is taken."""
    port = free_port()
    return {
        "dir": tmp_path_factory.mktemp("worker-metrics"),
        "port": port,
        "url": f"http://127.0.0.1:{port}/metrics",
    }


@pytest.fixture(scope="session")
def saga_worker_options(django_db_setup, worker_metrics) -> dict:
    """The suite's two worker nodes, started by the test kit's `saga_worker` fixture."""
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(worker_metrics["dir"]),
        "SAGAS_METRICS_WORKER_PORT": str(worker_metrics["port"]),
        "SAGAS_METRICS_WORKER_ADDRESS": "127.0.0.1",
    }
    return worker_options(nodes=2, concurrency=2, env=env)


# Whether the session's workers were started: a transactional test then waits for them to go
# quiet before its database is flushed (`_quiet_then_flush`).
_workers_started = False


@pytest.fixture(scope="session")
def workers(saga_worker) -> CeleryWorker:
    global _workers_started
    _workers_started = True
    return saga_worker


def _quiet_then_flush(flush):
    """Before any transactional test's flush, the session's workers finish what they were doing.

    A worker still busy with an earlier test's saga (a retry after an outage, the sweeper's
    re-send) writes rows while the flush's TRUNCATE takes its table locks: PostgreSQL then
    cancels one of them as a deadlock, and a flush that failed leaves Django's guards on the
    connections for every test after it.
    """

    def fixture_teardown(self) -> None:
        if _workers_started:
            with contextlib.suppress(AssertionError):  # the flush tries anyway
                wait_for(workers_quiet, timeout=60, what="the workers to go quiet")
        flush(self)

    return fixture_teardown


@pytest.fixture(autouse=True)
def forget_definitions():
    """Definitions a test registers (some of whose paths do not import, on purpose) are
    forgotten afterwards: `manage.py` commands run in this process check the registered ones
    (`sagas.E001`), and a later test must find the definitions it knows."""
    before = dict(definitions._registry)
    yield
    definitions._registry.clear()
    definitions._registry.update(before)


@pytest.fixture
def saga_db(transactional_db, workers):
    """A database the workers can see (committed transactions), and running workers.

    Afterwards it waits for the workers to go quiet before the database is flushed: a worker
    still finishing this test's saga would otherwise deadlock with the flush's TRUNCATE, and
    when PostgreSQL cancels the TRUNCATE, rows leak into the next test.
    """
    yield workers
    wait_for(workers_quiet, timeout=60, what="the workers to finish this test's sagas")


def workers_quiet() -> bool:
    from datetime import timedelta

    from django.utils import timezone

    from sagas.models import Saga

    with celery_app.connection_for_write() as conn:
        queued = conn.default_channel.client.llen(QUEUE)
    recent = timezone.now() - timedelta(seconds=2)
    busy = Saga.objects.filter(
        status__in=("pending", "running", "compensating"), updated_at__gt=recent
    ).exists()
    return queued == 0 and not busy


def wait_final(saga_id, timeout: float = 30) -> object:
    from sagas.models import Saga

    def final():
        saga = Saga.objects.get(pk=saga_id)
        return saga if saga.status in FINAL else None

    return wait_for(final, timeout=timeout, what=f"saga {saga_id} to reach a final state")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:  # URLError, refused, reset, timed out
        return False


@contextmanager
def running_server(
    env: dict[str, str], log: Path, ready_path: str = "/healthz", options: tuple[str, ...] = ()
) -> Iterator[str]:
    """A real `manage.py runserver` on a free port, with `options`; yields its base URL."""
    ARTIFACTS.mkdir(exist_ok=True)
    base = f"http://127.0.0.1:{free_port()}"
    cmd = [sys.executable, "manage.py", "runserver", base.rsplit("/", 1)[1], "--noreload", *options]
    with log.open("w") as output:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_for(
            lambda: proc.poll() is not None or answers(base + ready_path),
            timeout=60,
            what="the web server to answer",
        )
        assert proc.poll() is None, f"runserver exited; see {log}:\n{log.read_text()[-3000:]}"
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


# -- placing faults exactly ------------------------------------------------------------------


def lose_messages(monkeypatch) -> None:
    """Every chain the engine sends from this process is lost (as in a broker crash)."""
    monkeypatch.setattr("sagas.engine.dispatch.send_steps", lambda *args, **kwargs: None)
    monkeypatch.setattr("sagas.engine.dispatch.send_compensations", lambda *args, **kwargs: None)
    monkeypatch.setattr("sagas.engine.dispatch.send_members", lambda *args, **kwargs: None)


def attempt_in_process(saga_id, index: int) -> str:
    """One attempt of step `index`, run here as a worker would, but without the chain's error
    callback (as if the worker died right after the attempt): returns the outcome's kind."""
    from sagas import engine
    from sagas.models import Saga

    saga_id = str(saga_id)
    epoch = Saga.objects.values_list("epoch", flat=True).get(pk=saga_id)
    try:
        return engine.step_attempt(saga_id, index, epoch=epoch).kind
    except Exception as exc:
        return engine.step_attempt_failed(saga_id, index, exc, epoch=epoch).kind


def finished_sagas(count: int) -> None:
    """`count` finished sagas, and fresh statistics: a table whose history outweighs the sagas
    in flight, as the planner sees one in production (a plan on a few rows says little)."""
    from django.db import connection

    from sagas.models import Saga

    Saga.objects.bulk_create(
        Saga(name="history", status=("completed", "compensated")[i % 2], input={})
        for i in range(count)
    )
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_saga")
