"""Faults outside the saga's row lock (issue 17), each on real workers and PostgreSQL.

A compensation waits for an attempt that may still run after its session ended (case 1);
attempts that die before they commit, or whose own statement fails, are counted (case 2); a
killed attempt's session does not keep the saga locked (case 3); a bulk action re-checks each
saga against its filter under the saga's own lock (case 5); starts repeated at the same moment
with one idempotency key return the first saga, whichever unique index conflicts first (case 6).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
from django.db import connection, transaction

from sagas import engine, services
from sagas.bulk import BulkFilter
from sagas.engine import sweeper
from sagas.models import BulkAction, EventKind, Saga, SagaEvent, SagaNotice
from tests.conftest import wait_final, wait_for
from tests.factories import saga_rows

pytestmark = pytest.mark.django_db(transaction=True)


def waiting_for_a_lock() -> bool:
    """Whether another session of this database waits on a row lock (a saga's)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
        )
        return bool(cursor.fetchone()[0])


@contextmanager
def holding_the_lock_of(saga: Saga) -> Iterator[threading.Event]:
    """Another session holds the saga's row lock (as a running step would) until the event it
    yields is set; the test's own code runs in that session's thread through `then`."""
    locked, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []
    then: list = []

    def hold() -> None:
        try:
            with transaction.atomic():
                Saga.objects.select_for_update().get(pk=saga.pk)
                locked.set()
                assert release.wait(30)
                for action in then:
                    action()
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    release.then = then  # type: ignore[attr-defined]
    try:
        yield release
    finally:
        release.set()
        holder.join(30)
    assert not errors, errors


def test_a_bulk_compensate_skips_a_saga_an_operator_retried_while_it_waited(saga_db):
    """Issue 17, case 5: the filter said `failed`; while the bulk action waited for the saga's
    lock, an operator retried it. Under the lock it no longer matches: skipped and reported,
    and the retried saga completes (its order is not cancelled)."""
    retried, other = saga_rows(stopped_at=1), saga_rows(stopped_at=1)
    with holding_the_lock_of(retried) as release:
        bulk_action = services.bulk_action_start(
            action="compensate",
            bulk_filter=BulkFilter(name="three_steps", status="failed"),
            actor="alice",
            expected_count=2,
        )
        wait_for(waiting_for_a_lock, timeout=20, what="the bulk action to wait for the saga")
        # The operator's retry, in the session that holds the lock: it commits first.
        release.then.append(lambda: services.saga_retry(saga_id=retried.pk, actor="bob"))

    def finished() -> BulkAction | None:
        action = BulkAction.objects.get(pk=bulk_action.pk)
        return action if action.status == "completed" else None

    done = wait_for(finished, timeout=30, what="the bulk action to finish")
    assert (done.total, done.done, done.skipped, done.failed) == (2, 1, 1, 0)
    item = done.items.get(saga_id=retried.pk)
    assert (item.outcome, item.reason) == ("skipped", "The saga no longer matches the filter.")
    assert wait_final(retried.pk).status == "completed"
    assert wait_final(other.pk).status == "compensated"
    kinds = set(SagaEvent.objects.filter(saga=retried).values_list("kind", flat=True))
    assert EventKind.OPERATOR_COMPENSATE not in kinds


def test_starts_repeated_at_the_same_moment_return_the_first_saga(saga_db):
    """Issue 17, case 6: two requests start the same saga with one idempotency key at the same
    moment; whichever unique index (the key's, or one in flight per business key) conflicts
    first, the second gets the first saga, never `SagaKeyInFlight`."""
    rounds = 40

    def start(key: int, barrier: threading.Barrier, out: list) -> None:
        try:
            barrier.wait(10)
            out.append(
                services.saga_start(
                    name="one_per_account",
                    input={"account": {"id": key}},
                    idempotency_key=f"race-{key}",
                )
            )
        except BaseException as exc:
            out.append(exc)
        finally:
            connection.close()

    outcomes = []
    for key in range(rounds):
        barrier, out = threading.Barrier(2), []
        pair = [threading.Thread(target=start, args=(key, barrier, out)) for _ in range(2)]
        for thread in pair:
            thread.start()
        for thread in pair:
            thread.join(30)
        outcomes.append(out)
    refused = [o for out in outcomes for o in out if isinstance(o, BaseException)]
    assert refused == []
    for (first, created_first), (second, created_second) in outcomes:
        assert first.pk == second.pk
        assert sorted([created_first, created_second]) == [False, True]
    assert Saga.objects.filter(name="one_per_account").count() == rounds


@pytest.mark.parametrize(
    ("name", "step", "error_code"),
    [
        ("crash_loop", "dies", "worker_lost"),  # killed before it commits, every time
        ("own_statement_fails", "slow_query", "statement_timeout"),  # SQLSTATE 57014
    ],
)
def test_attempts_that_die_or_whose_statement_fails_are_counted(
    saga_db, tmp_path, name, step, error_code
):
    """Issue 17, case 2: an attempt whose process dies before it commits is redelivered, and
    one whose own statement times out raises an OperationalError; each is an attempt of the
    step, counted: three attempts (the policy's), then the step fails for good and the saga
    compensates. The action ran three times, no more."""
    runs = tmp_path / "runs"
    saga, _ = services.saga_start(name=name, input={"runs": str(runs)})
    final = wait_final(saga.pk, timeout=60)
    assert final.status == "compensated", (final.status, final.error_code)
    failed = final.steps.get(name=step)
    assert (failed.status, failed.attempts, failed.error_code) == ("failed", 3, error_code)
    assert runs.read_text().split("\n").count(step) == 3
    assert "undo first" in runs.read_text()


def end_sessions_idle_in_a_transaction() -> int:
    """End the sessions of this database that wait, inside a transaction, for their client (a
    step's attempt during its external call), as a PostgreSQL restart or a failover would."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'idle in transaction'"
        )
        return int(cursor.fetchone()[0])


def test_a_compensation_never_overlaps_an_attempt_that_may_still_run(saga_db, tmp_path, settings):
    """Issue 17, case 1: the charge's session ends while its provider call is on its way; the
    worker goes on. An operator aborts at once: the charge's compensation (it may have
    half-happened, `compensate_failed_step`) waits until the attempt cannot be running any
    more (its time limit, the hard kill's grace and a margin), so the refund comes after the
    charge lands, never before it."""
    settings.SAGAS_HARD_TIME_LIMIT_GRACE = 2  # as the suite's workers
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    saga, _ = services.saga_start(name="late_charge", input={"runs": str(runs), "gate": str(gate)})
    wait_for(
        lambda: runs.exists() and "charge started" in runs.read_text(),
        timeout=20,
        what="the charge's attempt to begin",
    )
    assert end_sessions_idle_in_a_transaction() >= 1
    plan = services.saga_plan(saga_id=saga.pk, action="compensate")  # the lock is free at once
    assert "charge may have an attempt running: its compensation waits up to 10 s" in plan.reason
    services.saga_compensate(saga_id=saga.pk, actor="operator")

    def refunded_or_waiting() -> bool:
        aborted = SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_COMPENSATE)
        return "refunded" in runs.read_text() or "waits_for" in aborted.detail

    wait_for(refunded_or_waiting, timeout=20, what="the refund, or the timeline saying it waits")
    # The sweeper, however eager, does not take a saga waiting for a fence as stalled; a
    # compensation message back from a restarted worker meanwhile counts no attempt.
    sweeper.sweep(stale_after=timedelta(microseconds=1))
    assert not SagaEvent.objects.filter(saga=saga, kind=EventKind.RECOVERED).exists()
    assert engine.attempt_lost(str(saga.pk), 1, forward=False, why="redelivered") is None
    assert saga.steps.get(name="charge").compensation_attempts == 0
    gate.touch()  # the provider answers: the charge lands
    final = wait_final(saga.pk, timeout=60)
    assert final.status == "compensated"
    lines = runs.read_text().split("\n")
    assert "charged" in lines and "refunded" in lines
    assert lines.index("charged") < lines.index("refunded"), lines


def test_a_killed_attempts_session_does_not_keep_the_saga_locked(saga_db, tmp_path):
    """Issue 17, case 3: a step killed at its hard time limit while PostgreSQL runs its query
    (60 s): the session must not outlive the attempt and shut the error callback out. The step
    fails for good (one attempt) and the saga compensates within seconds, not after the query.
    """
    runs = tmp_path / "runs"
    saga, _ = services.saga_start(name="stuck_in_a_query", input={"runs": str(runs)})
    final = wait_final(saga.pk, timeout=25)
    assert final.status == "compensated", (final.status, final.error_code)
    query = final.steps.get(name="query")
    # Killed at its hard limit, or its statement cut at that limit, or its connection broken
    # by the soft limit's interruption: whichever comes first, one attempt, counted.
    assert query.error_code in {"time_limit", "statement_timeout", "connection_lost"}
    assert (query.status, query.attempts) == ("failed", 1)
    assert "undo first" in runs.read_text()


def test_a_commit_whose_answer_is_lost_still_notifies_and_compensates(saga_db, tmp_path):
    """Issue 17, case 4: the charge is declined; the transaction that records it (the step
    failed for good, the saga compensating) commits, and its answer is lost, as when
    PostgreSQL restarts between the two. The `step_failed` signal is sent anyway, from the
    committed events, and the chain's error callback too: the saga compensates at once, not
    when the sweeper finds it."""
    from sagas.testing.models import Fault, FaultEffect, FaultPoint

    runs, signals = tmp_path / "runs", tmp_path / "signals"
    Fault.objects.create(
        step_name="charge",
        point=FaultPoint.BEFORE_ACTION,
        effect=FaultEffect.LOSE_COMMIT_ANSWER,
        remaining=1,
    )
    saga, _ = services.saga_start(
        name="declined_once", input={"runs": str(runs), "signals": str(signals)}
    )
    final = wait_final(saga.pk, timeout=30)
    assert final.status == "compensated", (final.status, final.error_code)
    assert "undo first" in runs.read_text()
    failed = SagaEvent.objects.get(saga=saga, kind=EventKind.STEP_FAILED)
    told = signals.read_text().splitlines()
    assert told and set(told) == {f"step_failed charge card_declined {failed.pk}"}, told
    wait_for(lambda: not SagaNotice.objects.filter(saga=saga).exists(), timeout=10)


def test_a_process_that_dies_between_its_commit_and_its_signals_is_made_up_for(saga_db, tmp_path):
    """Issue 17, case 4: the charge is declined, the transaction that records it commits, and
    the worker's process dies before it sends the `step_failed` signal (here: in the signal's
    first receiver) and before it ends the chain. The message comes back redelivered: its
    delivery sends the signal the transition's notice still owes, with the event's id, and
    ends the chain with the step's error, so that the saga compensates at once instead of
    waiting for the sweeper."""
    runs, signals, marker = (tmp_path / name for name in ("runs", "signals", "died"))
    saga, _ = services.saga_start(
        name="declined_once",
        input={"runs": str(runs), "signals": str(signals), "die_in_receiver": str(marker)},
    )
    final = wait_final(saga.pk, timeout=30)
    assert final.status == "compensated", (final.status, final.error_code)
    assert marker.exists()  # the process died after the commit
    failed = SagaEvent.objects.get(saga=saga, kind=EventKind.STEP_FAILED)
    wait_for(lambda: signals.exists(), timeout=10)
    assert signals.read_text().splitlines() == [f"step_failed charge card_declined {failed.pk}"]
    wait_for(lambda: not SagaNotice.objects.filter(saga=saga).exists(), timeout=10)


def test_signals_are_sent_once_and_their_notices_deleted_on_the_happy_path(saga_db, tmp_path):
    """A failure told at once leaves no notice, so the relay sends nothing more; a change that
    rolled back wrote none."""
    from sagas.engine.relay import relay

    signals = tmp_path / "signals"
    saga, _ = services.saga_start(
        name="declined_once", input={"runs": str(tmp_path / "runs"), "signals": str(signals)}
    )
    assert wait_final(saga.pk, timeout=30).status == "compensated"
    wait_for(lambda: signals.exists(), timeout=10)
    # The notice of the saga's last transition is deleted once its signals are sent, after its
    # commit: a moment after the saga is seen final.
    wait_for(lambda: not SagaNotice.objects.filter(saga=saga).exists(), timeout=10)
    assert relay(older_than=timedelta(0)) == 0
    assert len(signals.read_text().splitlines()) == 1


def test_a_statements_own_failure_is_told_from_a_lost_connection_by_its_sqlstate():
    """Issue 17, case 2: by SQLSTATE, whether Django wraps the error or an action's own
    psycopg raised it; a lost connection is not the statement's failure."""
    import psycopg
    from django.db import OperationalError

    from sagas.engine import statement_failure

    def wrapped(cause: BaseException) -> OperationalError:
        error = OperationalError(str(cause))
        error.__cause__ = cause
        return error

    assert statement_failure(psycopg.errors.QueryCanceled()) == "statement_timeout"
    assert statement_failure(wrapped(psycopg.errors.DeadlockDetected())) == "deadlock"
    assert statement_failure(wrapped(psycopg.errors.SerializationFailure())) == (
        "serialization_failure"
    )
    assert statement_failure(wrapped(psycopg.errors.LockNotAvailable())) == "lock_not_available"
    assert statement_failure(wrapped(psycopg.errors.AdminShutdown())) is None  # 57P01
    assert statement_failure(wrapped(psycopg.OperationalError("server closed"))) is None
    assert statement_failure(ValueError("57014")) is None
