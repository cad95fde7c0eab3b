"""The recovery sweeper and the delivery settings it relies on."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from sagaproject.celery import app as celery_app
from sagas.definitions import Step, registered
from sagas.engine import sweeper
from sagas.models import EventKind, Saga
from sagas.services import saga_retry, saga_start
from tests.conftest import attempt_in_process, finished_sagas, lose_messages, wait_final


def test_delivery_settings_that_recovery_relies_on():
    conf = celery_app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_connection_retry_on_startup is True
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert not conf.task_always_eager
    # A message must not come back from Redis while a step still runs or waits for its retry.
    visibility = conf.broker_transport_options["visibility_timeout"]
    steps = [s for d in registered().values() for s in d.steps if isinstance(s, Step)]
    for step in steps:
        for policy in (step.retry, step.compensation_retry):
            longest = step.time_limit + 10 + policy.longest_wait()
            assert longest < visibility, step.name
    # The sweeper must not mistake a step waiting for its retry for a lost one.
    for step in steps:
        assert step.retry.backoff_max < settings.SAGAS_RECOVERY_STALE_AFTER
    assert "sagas.sweep" in {entry["task"] for entry in conf.beat_schedule.values()}


def _age(saga: Saga, seconds: float) -> None:
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(seconds=seconds))


def test_a_saga_whose_first_message_was_lost_is_recovered(saga_db, monkeypatch):
    # The crash between commit and publish: the saga is committed, its chain never sent.
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="snapshot_demo", input={})
    monkeypatch.undo()
    saga.refresh_from_db()
    assert saga.status == "running" and saga.steps.get(index=0).status == "pending"

    assert sweeper.sweep(stale_after=timedelta(seconds=60)).recovered == []  # not stale yet
    _age(saga, 120)
    report = sweeper.sweep(stale_after=timedelta(seconds=60))
    assert report.recovered == [str(saga.pk)]
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    assert saga.recovery_attempts == 0  # progress since: the count of stalls starts again
    assert saga.events.filter(kind=EventKind.RECOVERED).count() == 1


def test_a_saga_that_never_progresses_is_dead_lettered(saga_db, monkeypatch):
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="snapshot_demo", input={})
    for _ in range(3):
        _age(saga, 3600)  # past every back-off
        sweeper.sweep(stale_after=timedelta(seconds=60), max_recoveries=2)
    saga.refresh_from_db()
    assert saga.status == "failed"
    assert saga.error_code == "recovery_exhausted"
    assert saga.error_message == "No progress after 2 recoveries in a row; needs an operator."

    # The operator retries once the cause is fixed: recovery counts afresh, so a later stall
    # is recovered rather than failed at once.
    monkeypatch.undo()
    saga_retry(saga_id=saga.pk, actor="operator")
    saga.refresh_from_db()
    assert saga.recovery_attempts == 0
    assert wait_final(saga.pk).status == "completed"


def test_recovery_backs_off_while_a_saga_makes_no_progress(saga_db, monkeypatch):
    """Sent again once, a saga is left alone twice as long before the next time (four times
    after that...): a saga that only waits in a long queue is not sent again and again."""
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="snapshot_demo", input={})
    stale = timedelta(seconds=60)
    _age(saga, 90)
    assert sweeper.sweep(stale_after=stale).recovered == [str(saga.pk)]
    _age(saga, 90)  # stale, but not twice as long
    assert sweeper.sweep(stale_after=stale).recovered == []
    _age(saga, 130)
    assert sweeper.sweep(stale_after=stale).recovered == [str(saga.pk)]
    _age(saga, 230)  # not four times as long
    assert sweeper.sweep(stale_after=stale).recovered == []
    monkeypatch.undo()
    _age(saga, 250)
    assert sweeper.sweep(stale_after=stale).recovered == [str(saga.pk)]
    assert wait_final(saga.pk).status == "completed"


def test_concurrent_sweepers_claim_each_saga_once(saga_db, monkeypatch):
    lose_messages(monkeypatch)
    sagas = [saga_start(name="snapshot_demo", input={})[0] for _ in range(6)]
    monkeypatch.undo()
    for saga in sagas:
        _age(saga, 120)
    reports: list[sweeper.SweepReport] = []

    def run() -> None:
        from django.db import connection

        reports.append(sweeper.sweep(stale_after=timedelta(seconds=60)))
        connection.close()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed = [saga_id for report in reports for saga_id in report.recovered]
    assert sorted(claimed) == sorted(str(s.pk) for s in sagas)
    for saga in sagas:
        assert wait_final(saga.pk).status == "completed"
        assert saga.events.filter(kind=EventKind.RECOVERED).count() == 1


def _hold_second_step(monkeypatch, name: str) -> Saga:
    """A saga whose first step completed and whose second step's message was lost."""
    lose_messages(monkeypatch)
    saga, _ = saga_start(name=name, input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    monkeypatch.undo()
    Saga.objects.filter(pk=saga.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    return saga


def test_a_saga_past_its_deadline_is_compensated(saga_db, monkeypatch):
    saga = _hold_second_step(monkeypatch, "deadline_demo")
    report = sweeper.sweep(stale_after=timedelta(hours=1))
    assert report.deadline_compensated == [str(saga.pk)]
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert saga.error_code == "deadline_passed"
    assert saga.events.filter(kind=EventKind.DEADLINE_PASSED).count() == 1


def test_a_saga_past_its_pivot_is_not_compensated_at_its_deadline(saga_db, monkeypatch):
    saga = _hold_second_step(monkeypatch, "deadline_pivot")
    for _ in range(2):
        assert sweeper.sweep(stale_after=timedelta(hours=1)).deadline_compensated == []
    saga.refresh_from_db()
    assert saga.status == "running"
    assert saga.events.filter(kind=EventKind.DEADLINE_PASSED).count() == 1


@pytest.mark.django_db
def test_the_sweeper_reads_the_sagas_in_flight_through_their_index():
    """However many finished sagas the table holds, the sweeper's query reads the sagas in
    flight only, through their index."""
    from django.db import connection

    finished_sagas(3000)
    sql, params = sweeper.stale_sagas(timezone.now(), timedelta(minutes=1)).query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "saga_in_flight_idx" in plan and "Seq Scan" not in plan, plan
