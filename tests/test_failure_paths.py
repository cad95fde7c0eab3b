"""The engine's failure paths, one test per case of the engine issue, on real workers.

Each test places its fault exactly: some run a step's attempt in this process (as a worker
would, without the chain's error callback) or suppress the messages the engine sends, then
hand the saga to the real worker processes and the sweeper and check where it ends.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.utils import timezone

from inventory.models import Product
from payments.gateway import gateway_recover
from payments.models import GatewayAttempt
from sagaproject.celery import app as celery_app
from sagas.definitions import register
from sagas.engine import sweeper
from sagas.exceptions import SagaBusy
from sagas.models import EventKind, Saga, SagaStep
from sagas.services import saga_compensate, saga_retry, saga_start
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from tests import sagadefs
from tests.conftest import attempt_in_process, lose_messages, wait_final, wait_for
from tests.factories import ProductFactory
from tests.test_order_saga import charges_for, order_of, step_statuses, submit

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])


# -- placing faults --------------------------------------------------------------------------


def stall(saga: Saga) -> None:
    """Make the saga look as if it had made no progress for a long time."""
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))


def sweep(**kwargs) -> sweeper.SweepReport:
    return sweeper.sweep(stale_after=timedelta(minutes=1), **kwargs)


def nodes_answering(workers) -> set[str]:
    """The test worker nodes whose main process answers a ping."""
    replies = celery_app.control.ping(destination=workers.node_names, timeout=2.0)
    return {name for reply in replies for name in reply}


# -- 1. charged and cancelled, never refunded ------------------------------------------------


def test_a_charge_interrupted_before_its_commit_is_refunded_when_the_saga_is_compensated(
    saga_db,
):
    """The worker dies after the gateway charged and before the step committed; the operator
    then compensates. The step's row was never completed, yet the customer was charged. The
    refund waits until no attempt of the charge can still be running (its time limit, the hard
    kill's grace and a margin: tests/settings.py shortens the time limit)."""
    product = ProductFactory(stock_on_hand=10)
    with transaction.atomic():
        saga = submit(product)
        Fault.objects.create(
            saga=saga,
            step_name="charge_payment",
            point=FaultPoint.AFTER_ACTION,
            effect=FaultEffect.CRASH,
        )
    wait_for(lambda: charges_for(saga).exists(), timeout=30, what="the gateway to charge")
    saga_compensate(saga_id=saga.pk, actor="operator")

    saga = wait_final(saga.pk, timeout=60)
    assert saga.status == "compensated"
    assert order_of(saga).status == "cancelled"
    assert [c.status for c in charges_for(saga)] == ["refunded"]


# -- 2. a hung step ---------------------------------------------------------------------------


def test_a_hung_step_is_killed_and_its_saga_follows_its_policy(saga_db):
    """A step that ignores its soft time limit: the hard limit kills it, each attempt counts,
    and with its retries spent the saga compensates. No worker node stops answering."""
    saga, _ = saga_start(name="hung_step", input={})
    saga = wait_final(saga.pk, timeout=60)
    assert saga.status == "compensated"
    hung = SagaStep.objects.get(saga=saga, name="hangs")
    assert hung.status == "failed"
    assert hung.error_code == "time_limit"
    assert hung.attempts == 2  # the policy's max_attempts
    assert step_statuses(saga) == ["compensated", "failed"]
    assert nodes_answering(saga_db) == set(saga_db.node_names)


# -- 3. retry of a saga that was compensating ------------------------------------------------


def test_retry_of_a_saga_failed_while_compensating_resumes_the_compensation(saga_db, monkeypatch):
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="three_steps", input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    saga_compensate(saga_id=saga.pk, actor="operator")  # its compensations are lost too
    stall(saga)
    sweep(max_recoveries=0)
    saga.refresh_from_db()
    assert (saga.status, saga.error_code) == ("failed", "recovery_exhausted")

    monkeypatch.undo()
    saga_retry(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert step_statuses(saga) == ["compensated", "pending", "pending"]
    completed = saga.events.filter(kind=EventKind.STEP_COMPLETED)
    assert list(completed.values_list("step_name", flat=True)) == ["first"]


# -- 4. a lost error callback ----------------------------------------------------------------


def test_a_business_failure_whose_error_callback_was_lost_is_never_retried(saga_db, monkeypatch):
    product = ProductFactory(stock_on_hand=1)
    lose_messages(monkeypatch)
    saga = submit(product, quantity=2)
    assert attempt_in_process(saga.pk, 0) == "done"
    assert attempt_in_process(saga.pk, 1) == "done"
    assert attempt_in_process(saga.pk, 2) == "fail"  # not enough stock; the callback is lost
    Product.objects.filter(pk=product.pk).update(stock_on_hand=10)  # stock arrives meanwhile

    monkeypatch.undo()
    stall(saga)
    sweep()
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "insufficient_stock")
    assert order_of(saga).status == "cancelled"
    assert [c.status for c in charges_for(saga)] == ["refunded"]


def test_exhausted_retries_whose_error_callback_was_lost_get_no_new_budget(saga_db, monkeypatch):
    product = ProductFactory(stock_on_hand=10)
    lose_messages(monkeypatch)
    saga = submit(product, token="tok_timeout")  # the gateway is out for this token
    assert attempt_in_process(saga.pk, 0) == "done"
    outcomes = [attempt_in_process(saga.pk, 1) for _ in range(4)]
    assert outcomes == ["retry", "retry", "retry", "fail"]  # max_attempts=4; callback lost

    monkeypatch.undo()
    stall(saga)
    sweep()
    saga = wait_final(saga.pk)
    assert saga.status == "failed"  # paused by the step's policy, for an operator
    assert order_of(saga).status == "pending"
    key = f"{saga.pk}:charge_payment"
    wait_for(lambda: not Saga.objects.filter(status="running").exists(), what="quiet")
    assert GatewayAttempt.objects.filter(idempotency_key=key).count() == 4
    assert SagaStep.objects.get(saga=saga, name="charge_payment").attempts == 4

    gateway_recover()
    saga_retry(saga_id=saga.pk, actor="operator")
    assert wait_final(saga.pk).status == "completed"


# -- 5. the context of a compensation re-run by an operator ----------------------------------


def test_a_compensation_retried_by_an_operator_sees_the_earlier_outputs(saga_db):
    with transaction.atomic():
        saga, _ = saga_start(name="context_in_compensation", input={})
        Fault.objects.create(
            saga=saga,
            step_name="second",
            point=FaultPoint.BEFORE_COMPENSATION,
            effect=FaultEffect.TRANSIENT_ERROR,
            remaining=2,  # the compensation's max_attempts: it fails for good once
        )
    saga = wait_final(saga.pk, timeout=60)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")

    saga_retry(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert step_statuses(saga) == ["compensated", "compensated", "failed"]


# -- 7. smaller ------------------------------------------------------------------------------


def test_a_saga_is_running_while_its_first_step_waits_for_a_retry(saga_db):
    with transaction.atomic():
        saga, _ = saga_start(name="first_step_retries", input={})
        Fault.objects.create(
            saga=saga,
            step_name="first",
            point=FaultPoint.BEFORE_ACTION,
            effect=FaultEffect.TRANSIENT_ERROR,
            remaining=1,
        )
    wait_for(
        lambda: saga.events.filter(kind=EventKind.STEP_RETRYING).exists(),
        what="the first attempt to fail",
    )
    saga.refresh_from_db()
    assert saga.status == "running"
    assert wait_final(saga.pk).status == "completed"


def test_progress_resets_the_recovery_count(saga_db, monkeypatch):
    """A saga that advances a step after each of many recoveries is never given up on."""
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="six_steps", input={})
    for index in range(6):
        stall(saga)
        report = sweep(max_recoveries=2)
        assert report.recovered == [str(saga.pk)], f"recovery {index + 1}"
        assert attempt_in_process(saga.pk, index) == "done"
    saga.refresh_from_db()
    assert saga.status == "completed"


def test_an_unimportable_transient_exception_does_not_turn_a_decline_into_a_pause(saga_db):
    register(sagadefs.stale_transient())
    saga, _ = saga_start(name="stale_transient", input={})
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")


def test_a_hung_compensation_is_killed_and_fails_for_an_operator(saga_db):
    """Compensations have a time limit of their own; a hung one is killed, each kill counts."""
    saga, _ = saga_start(name="hung_compensation", input={})
    saga = wait_final(saga.pk, timeout=60)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    first = SagaStep.objects.get(saga=saga, name="first")
    assert first.status == "compensation_failed"
    assert first.error_code == "time_limit"
    assert first.compensation_attempts == 2  # its compensation_retry's max_attempts
    assert nodes_answering(saga_db) == set(saga_db.node_names)


# -- lost, repeated and late error callbacks, on real workers --------------------------------


def _declining_saga_with_fault(effect: str) -> Saga:
    with transaction.atomic():
        saga, _ = saga_start(name="declines_second", input={})
        Fault.objects.create(
            saga=saga, step_name="second", point=FaultPoint.AFTER_FINAL_FAILURE, effect=effect
        )
    return saga


def test_a_worker_that_dies_before_the_error_callback_leaves_it_to_the_sweeper(saga_db):
    saga = _declining_saga_with_fault(FaultEffect.CRASH)
    # The decline is committed with the compensation it begins; then the worker dies, and the
    # redelivered message finds the step failed for good. Nothing is sent until the sweeper.
    wait_for(lambda: Saga.objects.get(pk=saga.pk).status == "compensating", what="the decline")
    saga.refresh_from_db()
    epoch = saga.epoch
    stall(saga)
    assert sweep().recovered == [str(saga.pk)]
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert saga.epoch == epoch + 1
    assert step_statuses(saga) == ["compensated", "failed"]
    assert saga.events.filter(kind=EventKind.STEP_FAILED).count() == 1  # never run again


def test_an_error_callback_sent_twice_sends_the_compensations_once(saga_db):
    saga = _declining_saga_with_fault(FaultEffect.REPEAT_CALLBACK)
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    wait_for(
        lambda: "error callback of an older chain" in worker_logs(saga_db),
        what="the repeated callback to arrive, a second later",
    )
    assert Saga.objects.get(pk=saga.pk).epoch == saga.epoch  # nothing sent after
    assert saga.events.filter(kind=EventKind.STEP_COMPENSATED).count() == 1
    assert not saga.events.filter(kind=EventKind.DUPLICATE_IGNORED).exists()


def _with_next_message_refused(product, step_name: str, **order) -> Saga:
    """An order saga whose `step_name` task, and its compensation's, commits and then cannot
    send its chain's next message: the broker refuses it, and Celery fails the task after its
    commit and sends the chain's error callback."""
    with transaction.atomic():
        saga = submit(product, **order)
        Fault.objects.create(
            saga=saga,
            step_name=step_name,
            point=FaultPoint.AFTER_COMMIT,
            effect=FaultEffect.REFUSE_NEXT,
            remaining=None,  # its action's message and its compensation's
        )
    return saga


def test_a_next_message_refused_after_a_commit_sends_the_rest_again_and_fails_nothing(saga_db):
    """The step committed; its task failed only to send the next one. The error callback must
    not take that for an attempt stopped at its time limit."""
    saga = _with_next_message_refused(ProductFactory(stock_on_hand=10), "create_order")
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    assert not SagaStep.objects.filter(saga=saga).exclude(error_code="").exists()
    steps = SagaStep.objects.filter(saga=saga).exclude(name="payment_confirmation")  # skipped
    assert set(steps.values_list("attempts", flat=True)) == {1}
    assert not saga.events.filter(kind=EventKind.STEP_RETRYING).exists()
    assert "Injected: the broker refused" in worker_logs(saga_db)  # the fault did fire


def test_a_compensations_next_message_refused_after_its_commit_fails_no_compensation(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = _with_next_message_refused(product, "reserve_inventory", country="AQ")
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "unsupported_destination")
    steps = SagaStep.objects.filter(saga=saga).order_by("index")
    assert [s.error_code for s in steps][:3] == ["", "", ""]  # no time limit recorded
    assert [s.compensation_attempts for s in steps][:3] == [1, 1, 1]
    assert not saga.events.filter(kind=EventKind.COMPENSATION_RETRYING).exists()
    assert Product.objects.get(pk=product.pk).stock_on_hand == 10
    assert [c.status for c in charges_for(saga)] == ["refunded"]


def worker_logs(workers) -> str:
    return "".join(log.read_text() for log in workers.logs)


def test_an_error_callback_rides_out_a_database_outage(saga_db, monkeypatch):
    """The callback meets a database that refuses connections: it is sent again later."""
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="declines_second", input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    assert attempt_in_process(saga.pk, 1) == "fail"
    monkeypatch.undo()
    epoch = Saga.objects.get(pk=saga.pk).epoch
    with database_refusing_workers():
        celery_app.signature(
            "sagas.on_step_failure", args=("a-failed-task", str(saga.pk)), kwargs={"epoch": epoch}
        ).apply_async()
        wait_for(
            lambda: f"saga {saga.pk}: database unavailable" in worker_logs(saga_db),
            what="the callback to meet the outage",
        )
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"


@contextmanager
def database_refusing_workers():
    """The test database refuses new connections and loses the workers' ones; this test's own
    connection stays (it must, to undo this)."""
    name = connection.settings_dict["NAME"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (mine,) = cursor.fetchone()
    # From the maintenance database: a database cannot shut its own door.
    with connection._nodb_cursor() as cursor:
        cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> %s",
            [name, mine],
        )
    try:
        yield
    finally:
        with connection._nodb_cursor() as cursor:
            cursor.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


# -- the operator acts while a step runs -------------------------------------------------------


def test_an_operator_action_on_a_saga_whose_step_runs_answers_busy(saga_db, tmp_path):
    gate = tmp_path / "gate"
    saga, _ = saga_start(name="gated_demo", input={"gate": str(gate)})
    wait_for(lambda: Path(f"{gate}.started").exists(), what="the step to start")
    started = time.monotonic()
    with pytest.raises(SagaBusy):
        saga_compensate(saga_id=saga.pk, actor="operator")
    assert time.monotonic() - started < 10
    gate.touch()
    assert wait_final(saga.pk).status == "completed"
