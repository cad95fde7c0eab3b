"""The edges of the safe defaults, found by an adversarial review (each failed before its fix):
a transient class a deploy moved, a renaming that loops, a broker that refused a retry, halts
mid-compensation, a cause kept across an operator's abort, a deadline passed while a bug was
fixed, checks that never raise, and migrate on a fresh database.

The functions and classes at the top are imported by the workers from the paths stored in
the tests' step rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import SystemCheckError
from django.utils import timezone
from psycopg import sql

from sagas import engine
from sagas.definitions import RetryPolicy, SagaDefinition, Step, StepContext, register
from sagas.exceptions import StepError

HERE = "tests.test_safe_defaults_edges"
ROOT = Path(__file__).resolve().parent.parent
RECORD, UNDO = "tests.sagadefs.record", "tests.sagadefs.undo"
FAST = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)


# -- run by the workers ----------------------------------------------------------------------


class RateLimited(StepError):
    """A declared error the step lists as transient (`retry.transient`)."""

    code = "rate_limited"


def rate_limited(ctx: StepContext) -> None:
    raise RateLimited("Slow down.")


def buggy_until_fixed(ctx: StepContext) -> dict:
    """A programming error until the file named `fixed` in the input exists (the fix)."""
    if not Path(ctx.input["fixed"]).exists():
        return {"total": ctx.input["no_such_key"]}
    return {"step": ctx.step}


def renamed_in_a_loop(ctx: StepContext) -> dict:
    return {"step": ctx.step}


# -- helpers ---------------------------------------------------------------------------------


def statuses(saga) -> list[str]:
    return list(saga.steps.order_by("index").values_list("status", flat=True))


def kinds(saga) -> list[str]:
    return list(saga.events.order_by("id").values_list("kind", flat=True))


def define(name: str, *steps: Step, **options) -> str:
    register(SagaDefinition(name=name, steps=list(steps), **options))
    return name


def epoch_of(saga_id) -> int:
    from sagas.models import Saga

    return Saga.objects.values_list("epoch", flat=True).get(pk=saga_id)


def compensate_in_process(saga_id, index: int) -> str:
    """One compensation attempt of step `index`, run here as a worker would, without the
    chain's error callback; returns the outcome's kind."""
    saga_id = str(saga_id)
    epoch = epoch_of(saga_id)
    try:
        return engine.compensation_attempt(saga_id, index, epoch=epoch).kind
    except Exception as exc:
        return engine.compensation_attempt_failed(saga_id, index, exc, epoch=epoch).kind


# -- system checks ---------------------------------------------------------------------------


def _server_params() -> dict[str, str]:
    conf = settings.DATABASES["default"]
    params = {
        "host": conf["HOST"] or conf.get("OPTIONS", {}).get("host", ""),
        "port": str(conf["PORT"] or ""),
        "user": conf["USER"] or "",
        "password": conf["PASSWORD"] or "",
    }
    return {key: value for key, value in params.items() if value}


@pytest.fixture
def empty_database():
    """A fresh, empty database on the suite's server (no tables yet), dropped afterwards."""
    params = _server_params()
    name = f"test_fresh_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    user = params.get("user", "postgres")
    password = f":{params['password']}" if params.get("password") else ""
    yield f"postgres://{user}{password}@{host}:{port}/{name}"
    with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


@pytest.mark.system
@pytest.mark.parametrize(
    "command",
    [["migrate", "--noinput"], ["check", "--database", "default"]],
    ids=["migrate", "check-database"],
)
def test_a_fresh_database_can_be_migrated_and_checked(empty_database, command):
    """Django's `migrate` runs the checks tagged `database` first (`databases=[alias]`): the
    stored-paths check (sagas.W008) must not query tables that do not exist yet. The deploy
    docs also say to run `check --database default` before a deploy."""
    import os

    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "sagaproject.settings",
        "DATABASE_URL": empty_database,
    }
    env.pop("SAGAS_MODULES", None)
    done = subprocess.run(
        [sys.executable, "manage.py", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def test_the_definitions_check_reports_a_module_that_raises_on_import(tmp_path, monkeypatch):
    """`manage.py check` must never raise: a step module that fails to import with something
    other than ImportError (a SyntaxError after a bad deploy, a module-level error) is
    reported as sagas.E001, not raised out of the check."""
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "steps.py").write_text("raise RuntimeError('module-level failure')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    define("imports_a_broken_module", Step("first", "brokenpkg.steps.act", UNDO))
    try:
        call_command("check")
    except SystemCheckError as error:  # reported as a check error: fine
        assert "sagas.E001" in str(error)


# -- a transient class moved by a deploy -----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_declared_transient_steperror_whose_path_a_deploy_moved_pauses(saga_db):
    """The step lists its StepError subclass as transient; a deploy moved the class (the old
    path does not import): nobody can tell whether the error is transient, so the saga
    pauses with the path named; only a BusinessError, never retried, needs no such class."""
    from sagas.models import EventKind
    from sagas.services import saga_start
    from tests.conftest import wait_final

    name = define(
        "moved_transient_steperror",
        Step("first", RECORD, UNDO, retry=FAST),
        Step(
            "second",
            f"{HERE}.rate_limited",
            UNDO,
            retry=RetryPolicy(
                max_attempts=3,
                backoff=0.05,
                backoff_max=0.1,
                transient=(f"{HERE}_old_location.RateLimited",),
            ),
            on_exhausted="pause",
        ),
    )
    saga, _ = saga_start(name=name, input={})
    saga = wait_final(saga.pk)
    assert EventKind.COMPENSATION_STARTED not in kinds(saga), (saga.status, saga.error_code)
    assert (saga.status, saga.error_code) == ("failed", "code_missing")


# -- SAGAS_RENAMED_CALLABLES that loops, read inside a worker ---------------------------------


@pytest.mark.system
@pytest.mark.django_db(transaction=True)
def test_a_renaming_loop_deployed_to_the_workers_never_compensates(transactional_db):
    """A deploy ships SAGAS_RENAMED_CALLABLES with a loop (the workers run no system check).
    The step's path cannot be resolved: a deploy problem, which pauses (`code_missing`), even
    where `on_unexpected_error="compensate"` (meant for bugs)."""
    from sagas.models import EventKind, Saga
    from sagas.services import saga_start
    from sagas.testing.worker import CeleryWorker
    from tests.conftest import QUEUE, wait_final, worker_options

    old, new = f"{HERE}.renamed_in_a_loop", f"{HERE}.renamed_elsewhere"
    name = define(
        "renaming_loop",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", old, UNDO, retry=FAST),
        on_unexpected_error="compensate",
    )
    queue = f"{QUEUE}-loop"
    options = worker_options(
        nodes=1,
        concurrency=1,
        name="review-loop",
        env={
            "CELERY_TASK_DEFAULT_QUEUE": queue,
            "TEST_SAGAS_RENAMED_CALLABLES": json.dumps({old: new, new: old}),
        },
    )
    with CeleryWorker(**{**options, "queue": queue}) as worker, worker.routed():
        saga, _ = saga_start(name=name, input={})
        saga = wait_final(saga.pk)
        worker.wait_idle(timeout=30)
    saga = Saga.objects.get(pk=saga.pk)
    assert EventKind.COMPENSATION_STARTED not in kinds(saga), (saga.status, saga.error_code)
    assert saga.status == "failed"


# -- an infrastructure failure outside the attempt --------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_retry_the_broker_refused_is_retried_not_taken_for_a_bug(transactional_db, monkeypatch):
    """The attempt failed transiently and was recorded as `retry`; publishing the retry
    failed (`Task.retry` raises `Reject(exc, requeue=False)`, and Celery's Request.on_failure
    calls the chain's errbacks with it). `chain_failed` sends the error callback with cause
    `celery.exceptions.Reject`: the broker's doing, so the step is sent again, nothing
    recorded, whatever the unexpected-error policy (here compensate)."""
    from sagas.models import Saga
    from sagas.services import saga_start
    from tests.conftest import attempt_in_process, lose_messages

    lose_messages(monkeypatch)
    name = define(
        "broker_refused_retry",
        Step("first", RECORD, UNDO, retry=FAST),
        Step(
            "second",
            "tests.sagadefs.fails_to_undo",  # raises TransientError
            UNDO,
            retry=RetryPolicy(max_attempts=5, backoff=0.05, backoff_max=0.1),
            on_unexpected_error="compensate",
        ),
    )
    saga, _ = saga_start(name=name, input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    assert attempt_in_process(saga.pk, 1) == "retry"
    epoch = epoch_of(saga.pk)
    engine.step_chain_failed(
        str(saga.pk),
        epoch,
        failed=1,
        cause="celery.exceptions.Reject",
        task_id=f"{saga.pk}:{epoch}:1",
    )
    saga = Saga.objects.get(pk=saga.pk)
    assert (saga.status, saga.direction) == ("running", "forward"), (
        saga.status,
        saga.direction,
        saga.error_code,
        statuses(saga),
    )


# -- a halted compensation -------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_halt_does_not_hide_a_compensation_that_was_under_way(transactional_db, monkeypatch):
    """The compensation of `second` ran once and failed (refund service down), and is to be
    retried; then the sweeper gives up (recovery_exhausted). `second` was reached: it stays
    owed, with its error, not shown `completed` as if its refund had never been tried."""
    from sagas.models import Saga
    from sagas.services import saga_start
    from tests.conftest import attempt_in_process, lose_messages
    from tests.test_failure_paths import stall, sweep

    lose_messages(monkeypatch)
    name = define(
        "halt_mid_retry",
        Step("first", RECORD, UNDO, retry=FAST),
        Step(
            "second",
            RECORD,
            "tests.sagadefs.fails_to_undo",
            retry=FAST,
            compensation_retry=RetryPolicy(max_attempts=5, backoff=0.05, backoff_max=0.1),
        ),
        Step("third", "tests.sagadefs.decline", UNDO),
    )
    saga, _ = saga_start(name=name, input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    assert attempt_in_process(saga.pk, 1) == "done"
    assert attempt_in_process(saga.pk, 2) == "fail"
    assert compensate_in_process(saga.pk, 1) == "retry"
    second = saga.steps.get(name="second")
    assert (second.status, second.error_code) == ("compensating", "refund_unavailable")
    stall(saga)
    sweep(max_recoveries=0)
    saga = Saga.objects.get(pk=saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "recovery_exhausted")
    second = saga.steps.get(name="second")
    assert (second.status, second.error_code, second.compensation_attempts) != (
        "completed",
        "",
        1,
    ), "a step whose compensation ran and failed is shown as completed, with no error"


@pytest.mark.django_db(transaction=True)
def test_a_halt_leaves_a_pending_step_pending(transactional_db, monkeypatch):
    """An operator aborts a saga whose second step (`compensate_failed_step`) has not run
    yet; the sweeper gives up before any compensation ran. The issue: the steps a halted
    compensation never reached keep the status they had: `second` stays pending."""
    from sagas.models import Saga
    from sagas.services import saga_compensate, saga_start
    from tests.conftest import attempt_in_process, lose_messages
    from tests.test_failure_paths import stall, sweep

    lose_messages(monkeypatch)
    name = define(
        "halt_pending",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", RECORD, UNDO, retry=FAST, compensate_failed_step=True),
    )
    saga, _ = saga_start(name=name, input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    assert statuses(saga) == ["completed", "pending"]
    saga_compensate(saga_id=saga.pk, actor="operator")
    assert statuses(saga) == ["compensating", "compensating"]
    # Time passes: the fence ends (`second` was in progress: an attempt of it might have run).
    past = timezone.now() - timedelta(seconds=1)
    assert saga.steps.filter(fenced_until__isnull=False).update(fenced_until=past) == 1
    stall(saga)
    sweep(max_recoveries=0)
    saga = Saga.objects.get(pk=saga.pk)
    assert saga.status == "failed"
    assert statuses(saga) == ["completed", "pending"]


# -- the cause of a retried backward saga ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_the_cause_survives_when_the_operator_compensated_after_recovery_gave_up(
    saga_db, monkeypatch
):
    """Going forward, the sweeper gives up (recovery_exhausted); the operator compensates;
    the compensation halts (compensation_failed); the operator retries it and it completes.
    The operator's abort clears `recovery_exhausted` (why it stopped, not why it compensates),
    so the compensated saga never ends with `compensation_failed` as its error."""
    from sagas.models import Saga
    from sagas.services import saga_compensate, saga_retry, saga_start
    from sagas.testing.models import Fault, FaultEffect, FaultPoint
    from tests.conftest import attempt_in_process, lose_messages, wait_final
    from tests.test_failure_paths import stall, sweep

    name = define(
        "cause_after_forward_exhaustion",
        Step("first", RECORD, UNDO, retry=FAST, compensation_retry=FAST),
        Step("second", RECORD, UNDO, retry=FAST),
    )
    lose_messages(monkeypatch)
    saga, _ = saga_start(name=name, input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    stall(saga)
    sweep(max_recoveries=0)
    saga = Saga.objects.get(pk=saga.pk)
    assert (saga.status, saga.direction, saga.error_code) == (
        "failed",
        "forward",
        "recovery_exhausted",
    )
    monkeypatch.undo()
    Fault.objects.create(
        saga=saga,
        step_name="first",
        point=FaultPoint.BEFORE_COMPENSATION,
        effect=FaultEffect.TRANSIENT_ERROR,
    )
    saga_compensate(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    Fault.objects.all().delete()
    saga_retry(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert saga.error_code != "compensation_failed", (saga.error_code, saga.error_message)


# -- a bug, fixed and retried, then the deadline ---------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_saga_paused_by_a_bug_then_fixed_and_retried_is_not_compensated_by_its_deadline(
    saga_db, monkeypatch, tmp_path
):
    """A bug pauses the saga (the new default); while the fix is deployed its deadline
    passes; the operator retries. The retry clears the passed deadline (its plan says so), so
    a sweep before the saga finishes does not compensate it. (Deterministic here: the retried
    chain is held back.)"""
    from sagas.models import EventKind, Saga
    from sagas.services import saga_plan, saga_retry, saga_start
    from tests.conftest import lose_messages, wait_final
    from tests.test_failure_paths import stall, sweep

    fixed = tmp_path / "fixed"
    name = define(
        "bug_then_deadline",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", f"{HERE}.buggy_until_fixed", UNDO, retry=FAST),
        Step("third", RECORD, UNDO, retry=FAST),
        deadline=1,
    )
    saga, _ = saga_start(name=name, input={"fixed": str(fixed)})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "unexpected_error")
    time.sleep(1.5)  # the fix takes longer than the deadline
    fixed.touch()
    plan = saga_plan(saga_id=saga.pk, action="retry")
    assert "deadline passed while it waited: the retry clears it" in plan.reason
    lose_messages(monkeypatch)
    saga_retry(saga_id=saga.pk, actor="operator")
    monkeypatch.undo()
    sweep()
    saga = Saga.objects.get(pk=saga.pk)
    compensating = saga.direction == "backward"
    if not compensating:  # let it finish
        stall(saga)
        sweep()
    wait_final(saga.pk, timeout=60)
    assert not compensating, (
        f"retried after a bug, compensated by the deadline; the plan said: {plan.reason}",
        kinds(saga).count(EventKind.DEADLINE_PASSED),
    )


def test_a_mistyped_unexpected_error_policy_is_caught_by_the_checks(settings):
    """SAGAS_ON_UNEXPECTED_ERROR = "compensated" (a typo): `manage.py check` says so
    (`sagas.E004`); a worker that meets an unexpected error meanwhile pauses its saga."""
    from django.core import checks

    settings.SAGAS_ON_UNEXPECTED_ERROR = "compensated"
    found = [m.id for m in checks.run_checks() if m.id and m.id.startswith("sagas.")]
    assert found == ["sagas.E004"], found


@pytest.mark.django_db(transaction=True)
def test_several_halts_of_a_compensated_failed_step_keep_the_cause_and_lose_nothing(saga_db):
    """The declined step is compensated itself (`compensate_failed_step`); its
    compensation fails, twice in a row across an operator's retry; then it works."""
    from sagas.models import EventKind, Saga
    from sagas.services import saga_plan, saga_retry, saga_start
    from sagas.testing.models import Fault, FaultEffect, FaultPoint
    from tests.conftest import wait_final

    name = define(
        "halts_twice",
        Step("first", RECORD, UNDO, retry=FAST, compensation_retry=FAST),
        Step(
            "second",
            "tests.sagadefs.decline",
            UNDO,
            compensate_failed_step=True,
            compensation_retry=FAST,
        ),
        Step("third", RECORD, UNDO, retry=FAST),
    )
    from django.db import transaction

    with transaction.atomic():
        saga, _ = saga_start(name=name, input={})
        Fault.objects.create(
            saga=saga,
            step_name="second",
            point=FaultPoint.BEFORE_COMPENSATION,
            effect=FaultEffect.TRANSIENT_ERROR,
        )
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    assert statuses(saga) == ["completed", "compensation_failed", "pending"]
    plan = saga_plan(saga_id=saga.pk, action="retry")
    assert plan.undo == ("second", "first")
    saga_retry(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    assert statuses(saga) == ["completed", "compensation_failed", "pending"]
    Fault.objects.all().delete()
    saga_retry(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert statuses(saga) == ["compensated", "compensated", "pending"]
    assert kinds(saga).count(EventKind.STEP_COMPENSATED) == 2
    assert Saga.objects.get(pk=saga.pk).direction == "backward"


@pytest.mark.django_db(transaction=True)
def test_an_operator_retrying_with_a_new_deadline_gets_that_deadline(
    saga_db, monkeypatch, tmp_path
):
    """Issue 17, case 6: the operator retries a saga paused by a bug, and gives it a new
    deadline instead of clearing the passed one. The plan says so; a sweep before the new
    deadline leaves the saga alone; one after it compensates the saga for its deadline.
    (The retried chain is held back, so the saga is still going when the sweeps come.)"""
    from datetime import timedelta

    from django.utils import timezone

    from sagas.models import Saga
    from sagas.services import saga_plan, saga_retry, saga_start
    from tests.conftest import lose_messages, wait_final
    from tests.test_failure_paths import sweep

    fixed = tmp_path / "fixed"
    name = define(
        "bug_then_new_deadline",
        Step("first", RECORD, UNDO, retry=FAST),
        Step("second", f"{HERE}.buggy_until_fixed", UNDO, retry=FAST),
        deadline=1,
    )
    saga, _ = saga_start(name=name, input={"fixed": str(fixed)})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("failed", "unexpected_error")
    time.sleep(1.2)  # its deadline passes while it waits
    fixed.touch()
    new = timezone.now() + timedelta(seconds=3)
    plan = saga_plan(saga_id=saga.pk, action="retry", deadline=new)
    assert f"Its deadline is set to {new.isoformat(timespec='seconds')}." in plan.reason
    lose_messages(monkeypatch)
    saga_retry(saga_id=saga.pk, actor="operator", deadline=new)
    assert sweep().deadline_compensated == []
    assert Saga.objects.get(pk=saga.pk).deadline_at == new
    time.sleep(max(0.0, (new - timezone.now()).total_seconds()) + 0.2)
    monkeypatch.undo()
    assert sweep().deadline_compensated == [str(saga.pk)]
    saga = wait_final(saga.pk, timeout=30)
    assert (saga.status, saga.error_code) == ("compensated", "deadline_passed")
