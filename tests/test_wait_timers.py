"""Timeouts fire on time: `sagas.wake`, sent by beat every few seconds, ends a wait within 5 s
of its due time, and applies a signal kept while its saga was busy as soon; it is cheap when
nothing is due, works in bounded batches, and the reference schedule lets copies expire.

The first test runs the real `celery beat` of the reference settings (the sweep put an hour
away, so that only the wake can do it) and the suite's real workers, which take its messages.
"""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from django.core import checks
from django.utils import timezone

from sagaproject.celery import app as celery_app
from sagas import services
from sagas.definitions import SagaDefinition, Step, Wait
from sagas.engine import waker
from sagas.models import EventKind, Saga, SagaEvent, SagaSignal, SagaStep
from tests.conftest import (
    ARTIFACTS,
    ROOT,
    attempt_in_process,
    lose_messages,
    wait_final,
    wait_for,
    worker_env,
)
from tests.test_bulk import locked_elsewhere

pytestmark = pytest.mark.django_db(transaction=True)

# The promise: a timeout fires within this many seconds of its due time.
ON_TIME = 5.0


def status(saga: Saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def timed_out_late_by(saga: Saga) -> float:
    """Seconds between the wait's due time and the moment its timeout was recorded."""
    event = SagaEvent.objects.get(saga=saga, kind=EventKind.WAIT_TIMED_OUT)
    return (event.created_at - datetime.fromisoformat(event.detail["due"])).total_seconds()


class Beat:
    """`celery beat` of the project, on the suite's queue and test database, logging to
    test-artifacts/beat-wake.log."""

    def __init__(self, schedule: Path, **env: str) -> None:
        self.log = ARTIFACTS / "beat-wake.log"
        ARTIFACTS.mkdir(exist_ok=True)
        command = [sys.executable, "-m", "celery", "-A", "sagaproject", "beat", "-l", "info"]
        with self.log.open("w") as output:
            self.proc = subprocess.Popen(
                [*command, "-s", str(schedule)],
                cwd=ROOT,
                env={**worker_env(), **env},
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def sent(self, entry: str) -> bool:
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        return f"Sending due task {entry}" in self.log.read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture
def beat(tmp_path):
    """Beat with the reference schedule, its sweep an hour away: only the wake ends a wait."""
    running = Beat(tmp_path / "schedule", SAGAS_WAKE_INTERVAL="2", SAGAS_SWEEP_INTERVAL="3600")
    try:
        wait_for(lambda: running.sent("sagas-wake"), timeout=60, what="beat's first wake")
        yield running
    finally:
        running.stop()


def test_beat_wakes_timeouts_and_kept_signals_within_seconds_of_their_time(saga_db, beat):
    timers = []
    for _ in range(3):
        saga, _ = services.saga_start(name="cools_off", input={})  # waits at once, for 1 s
        timers.append(saga)
        time.sleep(0.7)  # not a wait for anything: each due at another moment of beat's 2 s
    payment, _ = services.saga_start(name="waits_for_payment", input={"order": "o-wake"})
    wait_for(lambda: status(payment) == "waiting", timeout=20, what="the payment to wait")
    with locked_elsewhere(payment):  # a step holds the saga: the signal is kept
        kept = services.saga_signal(
            saga_id=payment.pk, event="payment_confirmed", payload={"reference": "3ds-w"}
        )
    released = timezone.now()
    assert kept.status == "kept"

    for saga in timers:
        assert wait_final(saga.pk, timeout=30).status == "completed"
    late = [timed_out_late_by(saga) for saga in timers]
    assert max(late) < ON_TIME, late
    completed = SagaEvent.objects.filter(saga=payment, kind=EventKind.WAIT_COMPLETED)
    applied = wait_for(completed.first, timeout=30, what="the kept signal to be applied")
    assert SagaSignal.objects.get(pk=kept.signal_id).status == "consumed"
    assert (applied.created_at - released).total_seconds() < ON_TIME
    assert wait_final(payment.pk, timeout=30).status == "completed"
    assert not beat.sent("sagas-sweep")  # the wake did it all


def test_a_wake_with_nothing_due_is_one_query(transactional_db, django_assert_num_queries):
    saga, _ = services.saga_start(name="cools_off", input={})  # a wait first: it waits at once
    assert status(saga) == "waiting"
    SagaStep.objects.filter(saga=saga).update(due_at=timezone.now() + timedelta(hours=1))
    with django_assert_num_queries(1):
        report = waker.wake()
    assert (report.waits_timed_out, report.signals_applied, report.batches) == ([], 0, 0)
    assert status(saga) == "waiting"


def test_the_wakes_check_counts_a_kept_signal_only_at_its_wait(transactional_db, monkeypatch):
    lose_messages(monkeypatch)  # the steps run here, when the test says
    confirmed = {"reference": "3ds-k"}
    early, _ = services.saga_start(name="waits_for_payment", input={"order": "o-early"})
    sent = services.saga_signal(saga_id=early.pk, event="payment_confirmed", payload=confirmed)
    assert sent.status == "kept"  # for a wait still to come: the wait consumes it
    assert waker.due(timezone.now()) == (False, False)

    busy, _ = services.saga_start(name="waits_for_payment", input={"order": "o-busy"})
    assert attempt_in_process(busy.pk, 0) == "done"
    assert status(busy) == "waiting"
    with locked_elsewhere(busy):  # a step holds the saga: kept, for the wait it waits at
        sent = services.saga_signal(saga_id=busy.pk, event="payment_confirmed", payload=confirmed)
    assert sent.status == "kept"
    assert waker.due(timezone.now()) == (True, False)
    assert waker.wake().signals_applied == 1
    assert SagaSignal.objects.get(pk=sent.signal_id).status == "consumed"
    assert waker.due(timezone.now()) == (False, False)


def due_timers(count: int) -> list[Saga]:
    """`count` sagas waiting on a timer that is due."""
    sagas = [services.saga_start(name="cools_off", input={})[0] for _ in range(count)]
    past = timezone.now() - timedelta(seconds=1)
    SagaStep.objects.filter(saga__in=sagas, status="waiting").update(due_at=past)
    return sagas


def test_a_wake_takes_batch_after_batch_while_they_are_full(transactional_db, monkeypatch):
    lose_messages(monkeypatch)  # the steps after the timers are not this test's
    monkeypatch.setattr(waker, "PER_TRANSACTION", 3)  # a batch's two commit together
    sagas = due_timers(5)
    report = waker.wake(batch_size=2)
    assert sorted(report.waits_timed_out) == sorted(str(s.pk) for s in sagas)
    assert report.batches == 3  # 2, 2, then 1: not full, the last
    assert waker.due(timezone.now()) == (False, False)


def test_timeouts_that_commit_together_are_each_ended_once(transactional_db, monkeypatch):
    lose_messages(monkeypatch)
    monkeypatch.setattr(waker, "PER_TRANSACTION", 2)
    sagas = due_timers(3)
    assert sorted(waker.time_out_due()) == sorted(str(s.pk) for s in sagas)
    for saga in sagas:  # each committed, its timeout on its timeline once
        assert SagaEvent.objects.filter(saga=saga, kind=EventKind.WAIT_TIMED_OUT).count() == 1
        assert status(saga) == "running"  # its next step sent (here: lost)
    assert waker.time_out_due() == []


def test_a_wake_takes_no_batch_past_its_time(transactional_db, monkeypatch):
    lose_messages(monkeypatch)
    due_timers(5)
    report = waker.wake(batch_size=2, max_seconds=0)
    assert (len(report.waits_timed_out), report.batches) == (2, 1)
    assert len(waker.wake(batch_size=2).waits_timed_out) == 3  # the next wake goes on


def test_a_wake_skips_a_saga_another_transaction_holds(transactional_db, monkeypatch):
    lose_messages(monkeypatch)
    held, free = due_timers(2)
    with locked_elsewhere(held):
        assert waker.wake().waits_timed_out == [str(free.pk)]
    assert waker.wake().waits_timed_out == [str(held.pk)]


def test_the_reference_schedule_sends_the_wake_every_2_s_and_lets_copies_expire():
    schedule = {entry["task"]: entry for entry in celery_app.conf.beat_schedule.values()}
    wake = schedule["sagas.wake"]
    assert wake["schedule"] == 2.0
    assert wake["options"]["expires"] == 10.0
    assert "sagas.sweep" in schedule  # the safety net stays


def wake_warnings() -> list[checks.CheckMessage]:
    return [m for m in checks.run_checks() if m.id == "sagas.W010"]


def test_a_project_with_waits_and_no_wake_in_its_schedule_is_warned(monkeypatch):
    assert not wake_warnings()  # the reference schedule has it
    without = {
        name: entry
        for name, entry in celery_app.conf.beat_schedule.items()
        if entry["task"] != "sagas.wake"
    }
    monkeypatch.setitem(celery_app.conf, "beat_schedule", without)
    (warning,) = wake_warnings()
    assert "sagas.wake" in warning.msg and warning.hint
    # Beat reading its schedule from elsewhere (django-celery-beat): the check cannot tell.
    monkeypatch.setitem(
        celery_app.conf, "beat_scheduler", "django_celery_beat.schedulers:DatabaseScheduler"
    )
    assert not wake_warnings()


def test_a_project_without_waits_needs_no_wake(monkeypatch):
    from sagas import definitions

    monkeypatch.setattr(definitions, "_registry", {})
    definitions.register(SagaDefinition(name="plain", steps=[Step("one", "tests.sagadefs.record")]))
    monkeypatch.setitem(celery_app.conf, "beat_schedule", {})
    assert not wake_warnings()
    definitions.register(
        SagaDefinition(
            name="timed",
            steps=[Wait("pause", timeout=1), Step("one", "tests.sagadefs.record")],
        )
    )
    assert len(wake_warnings()) == 1
