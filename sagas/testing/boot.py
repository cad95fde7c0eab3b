"""Imported by every worker `sagas.testing.worker.CeleryWorker` starts (`celery worker --include`).

It reads what the launcher put in the environment, so that a project's settings need not know
about it: which databases are the test ones (`SAGAS_TESTING_DATABASES`, alias to name, as the
test process renamed them), which queue the worker sends its own messages to
(`SAGAS_TESTING_QUEUE`, the one it consumes), and which file to create once the worker takes
messages (`SAGAS_TESTING_READY_FILE`).

With a queue of its own, the worker sends every task there, whatever the app's `task_routes`
say (a step's next message, an error callback). Without one, it listens on the app's default
queue and on every queue the app's routes send a saga task to, as a worker of the project must.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from celery import current_app
from celery.signals import worker_ready

from .worker import saga_queues, send_everything_to


def use_test_databases(names: dict[str, str]) -> None:
    """Point each database alias at its test database, as Django's test runner does in the
    test process (the server, user and options stay the settings' own)."""
    from django.conf import settings
    from django.db import connections

    for alias, name in names.items():
        settings.DATABASES[alias]["NAME"] = name
        connections[alias].settings_dict["NAME"] = name
        connections[alias].close()


if databases := os.environ.get("SAGAS_TESTING_DATABASES"):
    use_test_databases(json.loads(databases))

if queue := os.environ.get("SAGAS_TESTING_QUEUE"):
    # A chain's next message goes where the app's routes say, else to its default queue: keep
    # every one on this worker's own.
    send_everything_to(current_app, queue)
else:
    # (Imported as the worker starts: after it chose its queues, before it consumes them.)
    queues = current_app.amqp.queues
    for name in saga_queues(current_app):
        queues.select_add(queues[name])  # declared as `-Q <name>` would


@worker_ready.connect
def _ready(**kwargs: Any) -> None:
    if path := os.environ.get("SAGAS_TESTING_READY_FILE"):
        Path(path).touch()
