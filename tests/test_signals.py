"""The signals of `sagas.signals`: once per change, after the commit, never for a rollback.

The engine is driven in this process, as a worker drives it (its messages suppressed): a signal
is sent in the process that commits the change, and the receivers are connected here.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection, transaction

from sagas import engine, signals
from sagas.engine.relay import relay
from sagas.exceptions import TransientError
from sagas.models import Saga, SagaEvent, SagaNotice
from sagas.services import saga_compensate, saga_start
from sagas.tasks import attempt
from tests.conftest import lose_messages

pytestmark = pytest.mark.django_db(transaction=True)

NAMES = signals.__all__


@pytest.fixture
def received(monkeypatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Every signal received here, with its arguments and what the receiver saw: whether a
    transaction was still open, and the saga's status as the database has it."""
    lose_messages(monkeypatch)
    got: list[tuple[str, dict[str, Any]]] = []

    def receiver(name: str):
        def receive(sender, **kwargs):
            assert sender is Saga
            status = Saga.objects.values_list("status", flat=True).get(pk=kwargs["saga_id"])
            seen = {"in_transaction": connection.in_atomic_block, "db": status}
            got.append((name, {**kwargs, **seen}))

        return receive

    receivers = {name: receiver(name) for name in NAMES}
    for name, receive in receivers.items():
        getattr(signals, name).connect(receive)
    yield got
    for name, receive in receivers.items():
        getattr(signals, name).disconnect(receive)


def run(saga_id, index: int) -> str:
    """One delivery of a step's message, as the worker's task makes it."""
    epoch = Saga.objects.values_list("epoch", flat=True).get(pk=saga_id)
    return attempt(str(saga_id), index, epoch, forward=True).kind


def compensate(saga_id, index: int) -> str:
    epoch = Saga.objects.values_list("epoch", flat=True).get(pk=saga_id)
    return attempt(str(saga_id), index, epoch, forward=False).kind


def test_a_completed_saga_is_announced_once_started_and_once_completed(received):
    saga, _ = saga_start(name="three_steps", input={"n": 1})
    for index in range(3):
        assert run(saga.pk, index) == "done"
    assert run(saga.pk, 2) == "duplicate"  # a redelivery changes nothing: no signal

    assert [name for name, _ in received] == ["saga_started", "saga_completed"]
    started, completed = (kwargs for _, kwargs in received)
    ids = dict(SagaEvent.objects.filter(saga=saga).values_list("kind", "id"))
    assert started["event_id"] == ids["saga_started"]
    assert completed["event_id"] == ids["saga_completed"]
    assert not SagaNotice.objects.exists()  # each deleted once its signals were sent
    assert started["saga_id"] == saga.pk
    assert started["definition"] == "three_steps"
    assert started["input"] == {"n": 1}
    # Sent after the commit: no transaction open, and the change visible in the database.
    assert completed["in_transaction"] is False
    assert completed["db"] == "completed"


def test_a_failed_step_and_the_compensation_are_announced_once(received):
    saga, _ = saga_start(name="declines_second", input={})
    assert run(saga.pk, 0) == "done"
    assert run(saga.pk, 1) == "fail"  # a business error: failed for good, compensating
    epoch = Saga.objects.get(pk=saga.pk).epoch
    engine.step_chain_failed(str(saga.pk), epoch)
    assert compensate(saga.pk, 0) == "done"
    engine.step_chain_failed(str(saga.pk), epoch)  # a repeated error callback: nothing new

    names = [name for name, _ in received]
    assert names == ["saga_started", "step_failed", "saga_compensated"]
    failed, compensated = received[1][1], received[2][1]
    assert failed["step"] == "second"
    assert failed["index"] == 1
    assert failed["attempt"] == 1
    assert failed["exhausted"] is False
    assert failed["error_code"] == "declined"
    assert failed["error_message"] == "Declined."
    assert failed["db"] == "compensating"
    assert not failed["in_transaction"]
    assert compensated["error_code"] == "declined"
    assert compensated["db"] == "compensated"


def test_a_pause_and_a_dead_letter_are_announced(received):
    paused, _ = saga_start(name="snapshot_demo", input={})
    assert run(paused.pk, 0) == "done"
    epoch = Saga.objects.get(pk=paused.pk).epoch
    for _ in range(2):  # the policy's two attempts, both transient
        engine.step_attempt_failed(str(paused.pk), 1, TransientError("Down."), epoch=epoch)

    stalled, _ = saga_start(name="three_steps", input={})
    with transaction.atomic():
        engine.recover(stalled.pk, max_recoveries=0)

    kinds = [name for name, _ in received if name != "saga_started"]
    assert kinds == ["step_failed", "saga_paused", "saga_failed"]
    step, pause, dead = (kwargs for name, kwargs in received if name != "saga_started")
    assert step["exhausted"] is True
    assert step["attempt"] == 2
    assert step["error_code"] == "transient_error"
    assert pause["saga_id"] == paused.pk
    assert pause["step"] == "second"
    assert pause["reason"] == "paused by policy"
    assert pause["error_code"] == "transient_error"
    assert pause["db"] == "failed"
    assert dead["saga_id"] == stalled.pk
    assert dead["reason"] == "recovery_exhausted"
    assert dead["step"] is None
    assert dead["error_code"] == "recovery_exhausted"


def test_a_change_rolled_back_after_the_engine_made_it_in_memory_is_not_announced(received):
    """The last step completes, in memory, with the saga; then the saga's `on_complete` raises:
    the transaction rolls back, and nobody hears that the saga completed. Its failure, recorded
    in a transaction of its own, is announced."""
    saga, _ = saga_start(name="refuses_to_confirm", input={})
    assert run(saga.pk, 0) == "done"
    assert run(saga.pk, 1) == "fail"

    assert [name for name, _ in received] == ["saga_started", "step_failed"]
    assert received[1][1]["error_code"] == "not_confirmed"
    assert Saga.objects.get(pk=saga.pk).status == "compensating"


def test_nothing_is_announced_when_an_outer_transaction_rolls_back(received):
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        saga_start(name="three_steps", input={})
        raise Rollback
    assert received == []
    assert not Saga.objects.exists()

    saga, _ = saga_start(name="three_steps", input={})
    with pytest.raises(Rollback), transaction.atomic():
        saga_compensate(saga_id=saga.pk, actor="operator")  # nothing done: compensated at once
        assert received == [("saga_started", received[0][1])]  # not yet: not committed
        raise Rollback
    assert [name for name, _ in received] == ["saga_started"]

    saga_compensate(saga_id=saga.pk, actor="operator")
    assert [name for name, _ in received] == ["saga_started", "saga_compensated"]
    assert not SagaNotice.objects.exists()  # a rolled-back change wrote none


def test_a_receiver_that_raises_is_logged_and_the_engine_carries_on(monkeypatch, caplog):
    lose_messages(monkeypatch)

    def broken(sender, **kwargs):
        raise RuntimeError("a bug in a receiver")

    signals.saga_completed.connect(broken)
    try:
        saga, _ = saga_start(name="three_steps", input={})
        assert [run(saga.pk, index) for index in range(3)] == ["done"] * 3
    finally:
        signals.saga_completed.disconnect(broken)
    assert Saga.objects.get(pk=saga.pk).status == "completed"
    assert "receiver" in caplog.text and "saga_completed" in caplog.text


class Died(BaseException):
    """The process dies here: nothing after it in the process runs."""


def test_signals_a_process_died_before_sending_are_sent_by_the_relay(received):
    """The start commits, and its process dies before its signals are sent (here: in a
    receiver, whose exception no `robust` callback catches). The transition's notice stays:
    the relay sends the signal, with the same `event_id`, once it is older than it waits for,
    and once only; a notice it claimed is left alone as long by another relay."""
    calls = []

    def dies_once(sender, event_id, **kwargs):
        calls.append(event_id)
        if len(calls) == 1:
            raise Died

    signals.saga_started.connect(dies_once)
    try:
        with pytest.raises(Died):
            saga_start(name="three_steps", input={})
        saga = Saga.objects.get()
        assert [name for name, _ in received] == ["saga_started"]  # before it died
        assert SagaNotice.objects.filter(saga=saga).count() == 1
        assert relay(older_than=timedelta(minutes=1)) == 0  # its process may still send it
        assert relay(older_than=timedelta(0)) == 1
    finally:
        signals.saga_started.disconnect(dies_once)
    started = SagaEvent.objects.get(saga=saga, kind="saga_started")
    assert calls == [started.pk, started.pk]
    # At least once: the receivers called before the process died get it again, with the
    # event's id to tell that they did.
    assert [(name, kwargs["event_id"]) for name, kwargs in received] == [
        ("saga_started", started.pk)
    ] * 2
    assert not SagaNotice.objects.exists()
    assert relay(older_than=timedelta(0)) == 0


def test_a_long_transactions_notice_is_not_taken_for_unsent_while_its_process_sends_it(
    received,
):
    """A notice's time is its statement's, next to the COMMIT, not its transaction's start:
    a start at the end of a transaction longer than the relay's wait is not sent twice by a
    sweep that comes while its own process sends it."""
    import time

    relayed = []

    def sweep_now(sender, **kwargs):
        relayed.append(relay(older_than=timedelta(seconds=0.5)))

    signals.saga_started.connect(sweep_now)
    try:
        with transaction.atomic():
            Saga.objects.exists()  # the transaction begins
            time.sleep(0.7)
            saga_start(name="three_steps", input={})
    finally:
        signals.saga_started.disconnect(sweep_now)
    assert relayed == [0]
    assert [name for name, _ in received] == ["saga_started"]
    assert not SagaNotice.objects.exists()


def test_the_relay_keeps_a_notice_no_receiver_here_would_hear(monkeypatch, caplog):
    """The process that committed had a receiver and died; the relay's has none: the notice
    is kept, and an error says why, until a process with a receiver sends it."""
    lose_messages(monkeypatch)

    def dies(sender, **kwargs):
        raise Died

    signals.saga_started.connect(dies)
    try:
        with pytest.raises(Died):
            saga_start(name="three_steps", input={})
    finally:
        signals.saga_started.disconnect(dies)
    assert relay(older_than=timedelta(0)) == 0
    assert SagaNotice.objects.count() == 1
    assert "no receiver in this process" in caplog.text
    heard = []

    def hears(sender, event_id, **kwargs):
        heard.append(event_id)

    signals.saga_started.connect(hears)
    try:
        assert relay(older_than=timedelta(0)) == 1
    finally:
        signals.saga_started.disconnect(hears)
    assert heard == [SagaEvent.objects.get(kind="saga_started").pk]
    assert not SagaNotice.objects.exists()


def test_a_relayed_pause_tells_the_error_it_paused_with_not_the_sagas_later_one(received):
    """The operator retried the paused saga before the relay sent its `saga_paused`: the
    signal still tells why it paused."""
    from sagas.services import saga_retry

    def dies_once(sender, **kwargs):
        signals.saga_paused.disconnect(dies_once)
        raise Died

    saga, _ = saga_start(name="snapshot_demo", input={})
    assert run(saga.pk, 0) == "done"
    epoch = Saga.objects.get(pk=saga.pk).epoch
    engine.step_attempt_failed(str(saga.pk), 1, TransientError("Down."), epoch=epoch)
    signals.saga_paused.connect(dies_once)
    with pytest.raises(Died):
        engine.step_attempt_failed(str(saga.pk), 1, TransientError("Down."), epoch=epoch)
    saga_retry(saga_id=saga.pk, actor="operator")
    assert Saga.objects.get(pk=saga.pk).error_code == ""
    received.clear()
    assert relay(older_than=timedelta(0)) == 1
    names = [name for name, _ in received]
    assert "saga_paused" in names, names
    paused = dict(received)["saga_paused"]
    assert paused["error_code"] == "transient_error"
    assert paused["reason"] == "paused by policy"


def test_a_redelivery_ends_the_chain_of_a_failed_step_only_not_of_a_compensation():
    """A redelivered message of a step that failed for good ends its chain with the step's
    error (its error callback may never have been sent); one of a compensation that failed
    does not: that failure halted the saga, or carried on in the same chain."""
    from tests.factories import saga_rows

    saga = saga_rows(stopped_at=1)
    saga.steps.filter(index=1).update(error_code="boom", error_message="It failed.")
    failed = engine.after_unsure_commit(str(saga.pk), 1, forward=True, since=None)
    assert failed is not None and failed.code == "boom"
    saga.steps.filter(index=0).update(status="compensation_failed")
    assert engine.after_unsure_commit(str(saga.pk), 0, forward=False, since=None) is None
