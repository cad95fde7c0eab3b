"""pytest fixtures of the test kit (opt in: `pytest_plugins = ["sagas.testing.pytest_plugin"]`
in your top conftest.py, or `-p sagas.testing.pytest_plugin`).

`saga_worker` is a real worker of your Celery app for the test session, on a queue of its own
and on the test databases; while it runs, the tasks the tests send go to its queue, whatever
your `task_routes` say (and so do those the worker sends itself). Name the
app in pytest's configuration (`sagas_celery_app = "proj"`, as for `celery -A proj`), or
override `saga_worker_options` to pass `CeleryWorker` any of its arguments. Tests that start
sagas need committed data: `@pytest.mark.django_db(transaction=True)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import current_app

from .worker import CeleryWorker, test_database_env


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini("sagas_celery_app", "The Celery app of the saga worker (celery -A <this>).")


@pytest.fixture(scope="session")
def saga_worker_options(pytestconfig: pytest.Config) -> dict[str, Any]:
    """Keyword arguments of the session's `CeleryWorker`; override the fixture to change them."""
    app = pytestconfig.getini("sagas_celery_app")
    if not app:
        raise pytest.UsageError(
            'sagas.testing: set sagas_celery_app = "<your Celery app>" in pytest\'s '
            "configuration, or override the saga_worker_options fixture"
        )
    return {"app": app, "queue": f"sagas-test-{uuid.uuid4().hex[:8]}", "concurrency": 2}


@pytest.fixture(scope="session")
def saga_worker(
    django_db_setup: None, django_db_blocker: Any, saga_worker_options: dict[str, Any]
) -> Iterator[CeleryWorker]:
    """A real Celery worker on the test databases, for the whole session."""
    # (The test databases exist before the options are read: they may name them.)
    options = dict(saga_worker_options)
    env = {**options.pop("env", {}), **test_database_env()}
    worker = CeleryWorker(**options, env=env)
    worker.purge()
    with worker, worker.routed(current_app):
        yield worker
