"""The system checks (`sagas.checks`): each raised by the bad setting or path, absent with the
good one. The built wheel's in a fresh project: tests/test_adoption.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core import checks
from django.test.utils import override_settings

from sagaproject.celery import app as celery_app
from sagas import definitions
from sagas.definitions import SagaDefinition, Step
from sagas.services import saga_start
from sagas.testing.worker import CeleryWorker

RECORD, UNDO = "tests.sagadefs.record", "tests.sagadefs.undo"
ROOT = Path(__file__).resolve().parent.parent


def ids(**kwargs) -> list[str]:
    return sorted(m.id for m in checks.run_checks(**kwargs) if m.id and m.id.startswith("sagas."))


@pytest.fixture
def celery_conf():
    """The Celery app's settings, put back as they were afterwards."""
    before = dict(celery_app.conf.changes)
    yield celery_app.conf
    celery_app.conf.changes.clear()
    celery_app.conf.changes.update(before)


@pytest.fixture
def registered():
    """Definitions registered by the test, forgotten afterwards."""
    before = dict(definitions._registry)
    yield definitions.register
    definitions._registry.clear()
    definitions._registry.update(before)


def test_the_reference_project_passes_every_check():
    """Its own settings and sagas, without the test sagas (some of which break on purpose)."""
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "sagaproject.settings"}
    env.pop("SAGAS_MODULES", None)
    command = [sys.executable, "manage.py", "check", "--fail-level", "WARNING"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "sagas." not in done.stdout + done.stderr


@pytest.mark.parametrize(
    ("setting", "bad", "check"),
    [
        ("task_acks_late", False, "sagas.W001"),
        ("task_reject_on_worker_lost", False, "sagas.W002"),
        ("worker_prefetch_multiplier", 4, "sagas.W003"),
        ("broker_transport_options", {"visibility_timeout": 60}, "sagas.W004"),
        ("accept_content", ["json", "pickle"], "sagas.W005"),
        ("task_serializer", "pickle", "sagas.W005"),
        ("worker_pool", "threads", "sagas.W007"),
    ],
)
def test_each_celery_setting_the_guarantees_need_is_checked(celery_conf, setting, bad, check):
    assert check not in ids()
    celery_conf[setting] = bad
    found = [m for m in checks.run_checks() if m.id == check]
    assert len(found) == 1, found
    message = found[0]
    assert message.level == checks.WARNING and message.hint
    assert ids(include_deployment_checks=True).count(check) == 1


def test_the_visibility_timeout_must_outlast_the_longest_step(celery_conf, registered):
    celery_conf["broker_transport_options"] = {"visibility_timeout": 1000}
    assert "sagas.W004" not in ids()
    registered(SagaDefinition(name="slow", steps=[Step("slow", RECORD, UNDO, time_limit=1200)]))
    assert "sagas.W004" in ids()


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache:6380/0", "redis+socket:///run/redis.sock"]
)
def test_a_redis_broker_is_known_by_its_transport_not_its_scheme(celery_conf, monkeypatch, url):
    # (Celery reads the broker's URL from the environment first.)
    monkeypatch.setenv("CELERY_BROKER_URL", url)
    celery_conf["broker_transport_options"] = {"visibility_timeout": 60}
    assert "sagas.W004" in ids()
    monkeypatch.setenv("CELERY_BROKER_URL", "amqp://guest@127.0.0.1:5672//")
    assert "sagas.W004" not in ids()


def test_a_broker_url_kombu_cannot_read_does_not_break_the_checks(celery_conf, monkeypatch):
    # An unescaped "#" in a password: kombu refuses the URL; the check still runs.
    monkeypatch.setenv("CELERY_BROKER_URL", "redis://:pa#ss@127.0.0.1:6379/0")
    celery_conf["broker_transport_options"] = {"visibility_timeout": 60}
    assert "sagas.W004" in ids()
    # A list of URLs, for failover.
    monkeypatch.delenv("CELERY_BROKER_URL")
    celery_conf["broker_url"] = ["redis://127.0.0.1:6379/0", "redis://127.0.0.1:6380/0"]
    assert "sagas.W004" in ids()


def test_a_broker_connection_without_the_frameworks_fix_is_checked(monkeypatch):
    from celery.app.amqp import AMQP

    assert "sagas.W006" not in ids()
    monkeypatch.setattr(celery_app, "amqp_cls", AMQP)
    monkeypatch.setattr(celery_app, "amqp", AMQP(celery_app))
    assert "sagas.W006" in ids()


def test_a_registered_definition_whose_callable_does_not_import_is_an_error(registered):
    registered(SagaDefinition(name="typo", steps=[Step("one", "tests.sagadefs.recrod", UNDO)]))
    errors = [m for m in checks.run_checks() if m.id == "sagas.E001" and m.obj == "typo"]
    assert len(errors) == 1 and errors[0].level == checks.ERROR
    assert "tests.sagadefs.recrod" in errors[0].msg and "typo" in errors[0].msg


@override_settings(SAGAS_RENAMED_CALLABLES={"tests.sagadefs.recrod": RECORD})
def test_a_renamed_callable_is_found_under_its_new_path(registered):
    registered(SagaDefinition(name="typo", steps=[Step("one", "tests.sagadefs.recrod", UNDO)]))
    assert not [m for m in checks.run_checks() if m.obj == "typo"]


@pytest.mark.django_db(transaction=True)
def test_unfinished_sagas_whose_stored_paths_do_not_import_are_found_with_the_database(
    registered, monkeypatch
):
    monkeypatch.setattr("sagas.engine.dispatch.send_steps", lambda *args, **kwargs: None)
    registered(
        SagaDefinition(
            name="moved",
            steps=[Step("one", "tests.sagadefs.moved_away", UNDO)],
            on_complete="tests.sagadefs.also_moved",
        )
    )
    saga, _ = saga_start(name="moved", input={})
    definitions._registry.pop("moved")  # the deploy removed the definition too
    assert "sagas.W008" not in ids()  # without --database, no query
    found = [m for m in checks.run_checks(databases=["default"]) if m.id == "sagas.W008"]
    assert sorted(m.msg.split("'")[1] for m in found) == [
        "tests.sagadefs.also_moved",
        "tests.sagadefs.moved_away",
    ]
    assert all("1 unfinished saga" in m.msg for m in found)
    with override_settings(
        SAGAS_RENAMED_CALLABLES={
            "tests.sagadefs.moved_away": RECORD,
            "tests.sagadefs.also_moved": RECORD,
        }
    ):
        assert "sagas.W008" not in ids(databases=["default"])
    saga.__class__.objects.filter(pk=saga.pk).update(status="completed")
    assert "sagas.W008" not in ids(databases=["default"])


@pytest.mark.system
def test_a_worker_of_another_pool_says_so_in_its_log(tmp_path):
    """The pool is chosen on the worker's command line too, where no check can see it."""
    from tests.conftest import worker_options

    options = worker_options(nodes=1, concurrency=1, name="threads")
    log = tmp_path / "threads.log"
    with CeleryWorker(**{**options, "log": log, "args": ["--pool", "threads"]}):
        pass
    assert "sagas.W007" in log.read_text()
