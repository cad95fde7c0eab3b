"""Property-based run of the OpenAPI schema against a real server: no input may cause a 5xx.

Schemathesis reads /api/schema/ from a `runserver` on the test database and sends examples,
boundary cases and random (valid and invalid) requests to every operation, as a staff user.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rest_framework.authtoken.models import Token

from sagaproject.celery import app as celery_app
from tests.conftest import ARTIFACTS, running_server, worker_env
from tests.factories import ProductFactory, make_operator

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])

# Its own queue, purged afterwards: no worker runs the sagas that valid submissions start.
FUZZ_QUEUE = f"test-fuzz-{uuid.uuid4().hex[:8]}"
MAX_EXAMPLES = 15


@pytest.fixture
def server(transactional_db) -> Iterator[str]:
    env = {
        **worker_env(),
        "CELERY_TASK_DEFAULT_QUEUE": FUZZ_QUEUE,
        # The run sends many submissions a minute; throttling is tested in test_api.
        "ORDERS_THROTTLE_RATE": "100000/minute",
        "AUTH_THROTTLE_RATE": "100000/minute",
    }
    try:
        # One connection per request: runserver's kept-alive connections carry the unread
        # body of a refused request into the next one (its "Bad request syntax" page then
        # answers that one), which is the development server's, not the API's.
        log = ARTIFACTS / "fuzz-server.log"
        with running_server(env, log, options=("--nothreading",)) as base:
            yield base
    finally:
        with celery_app.connection_for_write() as conn:
            conn.default_channel.queue_purge(FUZZ_QUEUE)


def test_no_input_makes_a_server_error(server, tmp_path):
    # The example order in the schema names a real product, so that one request goes deep.
    ProductFactory(sku="MUG-CLASSIC")
    from django.contrib.auth.models import Permission

    # Every permission of the API, so that every operation is exercised past its permission
    # check (and none answers 403 before reading the body it was sent).
    operator = make_operator()
    operator.user_permissions.add(
        *Permission.objects.filter(codename__in=["signal_saga", "approve_saga"])
    )
    token = Token.objects.create(user=operator).key
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{server}/api/schema/",
            "--checks",
            "not_a_server_error",
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(MAX_EXAMPLES),
            "--header",
            f"Authorization: Token {token}",
            # One worker: with two threads, Hypothesis's ast.parse calls (to describe strategies)
            # hit Python 3.11's spurious "AST constructor recursion depth mismatch" SystemError
            # (CPython gh-106905), a tool error that says nothing about the API.
            "--workers",
            "1",
            "--seed",
            "20240601",
            "--request-timeout",
            "15",
            "--generation-database",
            "none",
            "--no-color",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    (ARTIFACTS / "fuzz-schemathesis.log").write_text(output)
    assert result.returncode == 0, output[-6000:]
