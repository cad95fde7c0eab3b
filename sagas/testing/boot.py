"""Imported by every worker `sagas.testing.worker.CeleryWorker` starts (`celery worker --include`).

It reads what the launcher put in the environment, so that a project's settings need not know
about it: which databases are the test ones (`SAGAS_TESTING_DATABASES`, alias to name, as the
test process renamed them), which queue the worker sends its own messages to
(`SAGAS_TESTING_QUEUE`, the one it consumes), and which file to create once the worker takes
messages (`SAGAS_TESTING_READY_FILE`). Without those variables it does nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from celery import current_app
from celery.signals import worker_ready


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
    # A chain's next message goes to the app's default queue: keep it on this worker's own.
    current_app.conf.task_default_queue = queue


@worker_ready.connect
def _ready(**kwargs: Any) -> None:
    if path := os.environ.get("SAGAS_TESTING_READY_FILE"):
        Path(path).touch()
