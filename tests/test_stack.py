"""`make run`'s stack: a process that dies is started again; Ctrl-C or SIGTERM stops everything."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import redis
from django.conf import settings

from tests.conftest import ADDRESS, ARTIFACTS, ROOT, answers, database_url, free_port, wait_for
from tests.test_docs_run import run_stack_block, stack_blocks


@contextmanager
def running_stack(env: dict[str, str], log: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m sagaproject.stack` on a free port; yields the process and its base URL."""
    ARTIFACTS.mkdir(exist_ok=True)
    port = free_port()
    log.write_text("")
    # Appending: supervisord and the processes it runs write to the same file.
    with log.open("a") as output:
        stack = subprocess.Popen(
            [sys.executable, "-m", "sagaproject.stack"],
            cwd=ROOT,
            env={**env, "PORT": str(port), "WORKER_CONCURRENCY": "1", "PYTHONUNBUFFERED": "1"},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(
            lambda: stack.poll() is not None or answers(base + "/healthz"),
            timeout=180,
            what="the stack's web server to answer",
        )
        assert stack.poll() is None, f"the stack exited:\n{log.read_text()[-4000:]}"
        yield stack, base
    finally:
        if stack.poll() is None:  # the test failed half-way: leave nothing running
            processes = [psutil.Process(stack.pid), *psutil.Process(stack.pid).children(True)]
            stack.terminate()
            _, alive = psutil.wait_procs(processes, timeout=120)
            for process in alive:
                process.kill()


def program(stack: subprocess.Popen, name: str) -> psutil.Process | None:
    """The process that supervisord runs as `name`: "runserver", "worker" or "beat"."""
    with contextlib.suppress(psutil.Error):
        for supervisord in psutil.Process(stack.pid).children():
            for process in supervisord.children():
                if name in process.cmdline():
                    return process
    return None


def stop(stack: subprocess.Popen, signum: int) -> None:
    """Stop the stack as a user does, and check that nothing it started is left running."""
    assert all(program(stack, name) for name in ("runserver", "worker", "beat"))
    processes = psutil.Process(stack.pid).children(recursive=True)
    stack.send_signal(signum)
    assert stack.wait(timeout=150) == 0
    _, alive = psutil.wait_procs(processes, timeout=30)
    assert alive == []


def api(base: str, path: str, body: dict | None = None, token: str = "") -> dict:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode() if body is not None else None,
        headers={
            "Content-Type": "application/json",
            **({"Authorization": f"Token {token}"} if token else {}),
        },
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_the_stack_starts_a_killed_worker_again(transactional_db, tmp_path):
    queue = f"test-stack-{uuid.uuid4().hex[:8]}"  # so that no other worker takes its messages
    env = {
        **os.environ,
        "DATABASE_URL": database_url(settings.DATABASES["default"]),
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        # A folder that does not exist yet, as `.local/` on a fresh clone: beat keeps its
        # schedule there.
        "SAGAS_DATA_DIR": str(tmp_path / "fresh" / "data"),
        # For the pages' requests and the spans they look at (tests/test_docs_run.py).
        "SAGAS_METRICS_WORKER_PORT": str(metrics_port := free_port()),
        "SAGAS_TRACING": "1",
        "SAGAS_TRACES_FILE": str(tmp_path / ".local" / "traces.jsonl"),
    }
    log = ARTIFACTS / "stack.log"
    try:
        with running_stack(env, log) as (stack, base):
            worker = wait_for(lambda: program(stack, "worker"), timeout=30, what="the worker")
            beat = wait_for(lambda: program(stack, "beat"), timeout=30, what="beat")
            wait_for(lambda: " ready." in log.read_text(), timeout=60, what="the worker")

            worker.kill()  # SIGKILL, as the kernel's OOM killer would
            wait_for(
                lambda: (new := program(stack, "worker")) is not None and new.pid != worker.pid,
                timeout=30,
                what="supervisord to start the worker again",
            )
            wait_for(
                lambda: log.read_text().count(" ready.") >= 2,
                timeout=60,
                what="the new worker to be ready",
            )

            token = api(base, "/api/auth/token/", {"username": "demo", "password": "demo"})
            order = api(
                base,
                "/api/orders/",
                {
                    "items": [{"sku": "MUG-CLASSIC", "quantity": 1}],
                    "shipping_address": ADDRESS,
                    "payment_token": "tok_ok",
                },
                token["token"],
            )
            saga_url = f"/api/sagas/{order['saga']['id']}/"
            wait_for(
                lambda: api(base, saga_url, token=token["token"])["status"] == "completed",
                timeout=60,
                what="the order saga to complete on the new worker",
            )
            assert program(stack, "beat").pid == beat.pid  # it ran all along

            # The pages' requests to a running stack, as the demo user and as staff.
            curl = shutil.which("curl")
            staff = api(base, "/api/auth/token/", {"username": "admin", "password": "admin"})
            variables = {
                "T": token["token"],
                "STAFF": staff["token"],
                "ORDER_ID": str(order["id"]),
                "SAGA_ID": order["saga"]["id"],
            }
            for block in stack_blocks() if curl else []:
                worker_metrics = f"127.0.0.1:{metrics_port}"
                run_stack_block(
                    block,
                    base=base,
                    worker_metrics=worker_metrics,
                    variables=variables,
                    cwd=tmp_path,
                )
            stop(stack, signal.SIGINT)  # Ctrl-C
            if not curl:
                pytest.skip("curl is not installed: the pages' requests to the stack did not run")
    finally:
        with contextlib.suppress(redis.RedisError):
            redis.Redis.from_url(os.environ["CELERY_BROKER_URL"]).delete(queue)


@pytest.mark.embedded
def test_the_stack_stops_its_embedded_servers_on_sigterm(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    data = tmp_path / "data"
    env.update(SAGAS_DATA_DIR=str(data), CELERY_TASK_DEFAULT_QUEUE="test-stack-embedded")
    with running_stack(env, ARTIFACTS / "stack-embedded.log") as (stack, _):
        assert (data / "postgres" / "postmaster.pid").exists()
        assert (data / "redis" / "redis.sock").exists()
        wait_for(lambda: program(stack, "beat"), timeout=30, what="beat")
        stop(stack, signal.SIGTERM)
    assert not (data / "postgres" / "postmaster.pid").exists()
    assert not (data / "redis" / "redis.sock").exists()
