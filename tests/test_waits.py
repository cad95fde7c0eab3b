"""Waits: a saga waits for an event (a signal) or a time, holding no worker and no message;
the signal, the timeout or an operator ends the wait, under the saga's lock, exactly once.

Real workers run the steps (`saga_db`); the sweeper runs here, as beat would run it.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import connection
from django.utils import timezone

from sagas import services
from sagas.engine import sweeper
from sagas.exceptions import SignalError
from sagas.models import EventKind, Saga, SagaEvent, SagaSignal, SagaStep
from tests.conftest import lose_messages, wait_final, wait_for
from tests.test_bulk import locked_elsewhere

pytestmark = pytest.mark.django_db(transaction=True)

CONFIRMED = {"reference": "3ds-1"}


def start(name: str = "waits_for_payment", order: str = "o-1", **input):
    saga, _ = services.saga_start(name=name, input={"order": order, **input})
    return saga


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def waiting(saga) -> bool:
    return status(saga) == "waiting"


def sweep() -> sweeper.SweepReport:
    return sweeper.sweep(stale_after=timedelta(minutes=1))


def kinds(saga) -> list[str]:
    return list(SagaEvent.objects.filter(saga=saga).order_by("id").values_list("kind", flat=True))


def test_a_signal_ends_the_wait_and_its_payload_is_the_next_steps_to_read(saga_db):
    saga = start()
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    wait = SagaStep.objects.get(saga=saga, name="confirmation")
    assert wait.status == "waiting" and wait.due_at is not None
    assert SagaStep.objects.get(saga=saga, name="ship").status == "pending"  # not before it

    outcome = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert (outcome.status, outcome.stage) == ("consumed", "confirmation")
    final = wait_final(saga.pk, timeout=20)
    assert final.status == "completed"
    steps = {s.name: s for s in SagaStep.objects.filter(saga=saga)}
    assert steps["confirmation"].output == CONFIRMED
    assert steps["ship"].output == {"confirmed": CONFIRMED}
    assert steps["confirmation"].due_at is None
    assert kinds(saga).count(EventKind.WAIT_COMPLETED) == 1


def test_a_signal_before_the_wait_is_kept_and_consumed_when_the_saga_gets_there(
    saga_db, monkeypatch
):
    lose_messages(monkeypatch)  # the start's chain is held back: the saga is not there yet
    saga = start(order="o-early")
    outcome = services.saga_signal(
        name="waits_for_payment", key="o-early", event="payment_confirmed", payload=CONFIRMED
    )
    assert outcome.status == "kept"
    assert EventKind.SIGNAL_KEPT in kinds(saga)
    monkeypatch.undo()
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert sweep().recovered == [str(saga.pk)]  # the chain is sent now
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert SagaSignal.objects.get(pk=outcome.signal_id).status == "consumed"
    assert SagaStep.objects.get(saga=saga, name="ship").output == {"confirmed": CONFIRMED}


def test_a_repeated_signal_has_no_second_effect_and_one_after_the_wait_is_refused(saga_db):
    saga = start(order="o-twice")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    first = services.saga_signal(
        saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED, idempotency_key="wh-1"
    )
    again = services.saga_signal(
        saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED, idempotency_key="wh-1"
    )
    assert first.status == again.status == "consumed"
    assert again.repeated and again.signal_id == first.signal_id
    assert wait_final(saga.pk, timeout=20).status == "completed"
    late = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert late.status == "refused" and "completed" in late.reason
    assert kinds(saga).count(EventKind.WAIT_COMPLETED) == 1
    assert EventKind.SIGNAL_REFUSED in kinds(saga)


def test_a_timeout_compensates_and_a_signal_after_it_is_refused(saga_db, tmp_path):
    runs = tmp_path / "runs"
    saga = start("waits_briefly", order="o-late", runs=str(runs))
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    assert sweep().waits_timed_out == []  # not due yet
    wait_for(lambda: str(saga.pk) in sweep().waits_timed_out, timeout=10, what="the timeout")
    final = wait_final(saga.pk, timeout=20)
    assert (final.status, final.error_code) == ("compensated", "wait_timed_out")
    assert runs.read_text() == "undo reserve\n"
    late = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert late.status == "refused"
    assert SagaStep.objects.get(saga=saga, name="ship").status == "pending"  # never ran


def test_a_wait_that_paused_at_its_timeout_waits_again_when_retried(saga_db):
    saga = start("waits_briefly_then_pauses", order="o-pause")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    wait_for(lambda: str(saga.pk) in sweep().waits_timed_out, timeout=10, what="the timeout")
    paused = Saga.objects.get(pk=saga.pk)
    assert (paused.status, paused.error_code) == ("failed", "wait_timed_out")
    plan = services.saga_plan(saga_id=saga.pk, action="retry")
    assert plan.allowed and plan.run == ("confirmation", "ship")
    before = timezone.now()
    services.saga_retry(saga_id=saga.pk, actor="operator")
    wait = SagaStep.objects.get(saga=saga, name="confirmation")
    assert status(saga) == "waiting" and wait.due_at > before  # a new timeout
    outcome = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert outcome.status == "consumed"
    assert wait_final(saga.pk, timeout=20).status == "completed"


def test_a_timer_waits_then_goes_on(saga_db):
    saga, _ = services.saga_start(name="cools_off", input={})
    wait_for(lambda: waiting(saga), timeout=10, what="the timer to begin")
    assert SagaStep.objects.get(saga=saga, name="charge").status == "pending"
    wait_for(lambda: str(saga.pk) in sweep().waits_timed_out, timeout=10, what="the timer")
    assert wait_final(saga.pk, timeout=20).status == "completed"


def test_an_abort_while_waiting_compensates_and_discards_the_signals_kept(saga_db, monkeypatch):
    saga = start(order="o-abort")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    plan = services.saga_plan(saga_id=saga.pk, action="compensate")
    assert plan.allowed and plan.undo == ("reserve",)
    services.saga_compensate(saga_id=saga.pk, actor="operator")
    assert SagaStep.objects.get(saga=saga, name="confirmation").status == "pending"
    assert wait_final(saga.pk, timeout=20).status == "compensated"
    refused = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert refused.status == "refused"

    lose_messages(monkeypatch)
    kept_saga = start(order="o-abort-2")
    kept = services.saga_signal(saga_id=kept_saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert kept.status == "kept"
    services.saga_compensate(saga_id=kept_saga.pk, actor="operator")  # nothing done yet
    assert status(kept_saga) == "compensated"
    assert SagaSignal.objects.get(pk=kept.signal_id).status == "discarded"
    assert EventKind.SIGNAL_DISCARDED in kinds(kept_saga)


def test_waiting_sagas_hold_no_worker(saga_db):
    """More sagas wait than the workers have processes, and another saga still completes."""
    waiting_sagas = [start(order=f"o-hold-{i}") for i in range(8)]
    for saga in waiting_sagas:
        wait_for(lambda saga=saga: waiting(saga), timeout=30, what="the sagas to wait")
    other, _ = services.saga_start(name="three_steps", input={})
    assert wait_final(other.pk, timeout=20).status == "completed"
    assert all(waiting(saga) for saga in waiting_sagas)


def test_a_bad_signal_is_refused_before_anything_changes(saga_db):
    saga = start(order="o-bad")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    with pytest.raises(ValidationError) as invalid:
        services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload={"x": 1})
    assert "A confirmation has a reference." in str(invalid.value)
    with pytest.raises(ValidationError, match="At most 1000 bytes"):
        services.saga_signal(
            saga_id=saga.pk, event="payment_confirmed", payload={"reference": "x" * 2000}
        )
    with pytest.raises(SignalError, match="no wait for the event"):
        services.saga_signal(saga_id=saga.pk, event="payment_declined")
    with pytest.raises(SignalError, match="No waits_for_payment saga"):
        services.saga_signal(name="waits_for_payment", key="nobody", event="payment_confirmed")
    assert not SagaSignal.objects.exists()
    assert waiting(saga)


def test_a_signal_that_fails_the_wait_compensates(saga_db):
    saga = start(order="o-3ds-failed")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    outcome = services.saga_signal(
        saga_id=saga.pk,
        event="payment_confirmed",
        fail={"code": "3ds_failed", "message": "3-D Secure failed."},
    )
    assert outcome.status == "consumed"
    final = wait_final(saga.pk, timeout=20)
    assert (final.status, final.error_code) == ("compensated", "3ds_failed")


def test_a_signal_while_a_step_holds_the_saga_is_kept_and_applied_by_the_sweep(saga_db):
    saga = start(order="o-busy")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    with locked_elsewhere(saga):
        outcome = services.saga_signal(
            saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED
        )
    assert outcome.status == "kept"
    assert waiting(saga)
    assert sweep().signals_applied == 1
    assert wait_final(saga.pk, timeout=20).status == "completed"


def test_a_deadline_runs_while_the_saga_waits(saga_db):
    saga = start(order="o-deadline")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    Saga.objects.filter(pk=saga.pk).update(deadline_at=timezone.now() - timedelta(seconds=1))
    assert sweep().deadline_compensated == [str(saga.pk)]
    final = wait_final(saga.pk, timeout=20)
    assert (final.status, final.error_code) == ("compensated", "deadline_passed")


def test_a_signal_and_the_timeout_at_the_same_moment_end_the_wait_once(saga_db):
    saga = start("waits_briefly", order="o-race")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    wait_for(
        lambda: SagaStep.objects.get(saga=saga, name="confirmation").due_at < timezone.now(),
        timeout=5,
    )
    results: dict[str, object] = {}

    def signal() -> None:
        try:
            results["signal"] = services.saga_signal(
                saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED
            ).status
        finally:
            connection.close()

    thread = threading.Thread(target=signal)
    thread.start()
    results["sweep"] = sweep().waits_timed_out
    thread.join()
    final = wait_final(saga.pk, timeout=20)
    ended = [k for k in kinds(saga) if k in (EventKind.WAIT_COMPLETED, EventKind.WAIT_TIMED_OUT)]
    assert len(ended) == 1, (ended, results)
    if ended == [EventKind.WAIT_COMPLETED]:
        assert results["signal"] == "consumed" and final.status == "completed"
    else:
        assert results["signal"] == "refused" and final.status == "compensated"


def test_the_api_sends_signals_with_answers_by_outcome_and_refuses_bad_ones(saga_db):
    from django.contrib.auth.models import Permission
    from rest_framework.test import APIClient

    from tests.factories import make_operator

    operator = make_operator()
    client = APIClient()
    client.force_authenticate(operator)
    saga = start(order="o-api")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    url = f"/api/sagas/{saga.pk}/signals/"
    body = {"event": "payment_confirmed", "payload": CONFIRMED, "idempotency_key": "wh-9"}

    assert client.post(url, body, format="json").status_code == 403  # not its permission
    operator.user_permissions.add(Permission.objects.get(codename="signal_saga"))
    operator = type(operator).objects.get(pk=operator.pk)  # permissions are cached
    client.force_authenticate(operator)
    for bad, field in [
        ({"event": "payment_confirmed", "payload": {"x": 1}}, "payload"),
        ({"event": "payment_declined"}, "event"),
        ({"event": ""}, "event"),
        ({"payload": CONFIRMED}, "event"),
        ({"event": "payment_confirmed", "payload": {"reference": "x" * 5000}}, "payload"),
        ({**body, "idempotency_key": "has spaces"}, "idempotency_key"),
        ({**body, "fail": {"code": "Bad Code", "message": "x"}}, "fail"),
        ({**body, "colour": "blue"}, "colour"),
    ]:
        answer = client.post(url, bad, format="json")
        assert answer.status_code == 400, (bad, answer.content)
        assert field in answer.json(), (bad, answer.json())
    for hostile in (["a list"], "a string", 7, None):
        assert client.post(url, hostile, format="json").status_code == 400
    assert waiting(saga) and not SagaSignal.objects.exists()

    consumed = client.post(url, body, format="json")
    assert consumed.status_code == 200, consumed.content
    assert consumed.json()["status"] == "consumed" and consumed.json()["stage"] == "confirmation"
    again = client.post(url, body, format="json")
    assert again.status_code == 200 and again.json()["repeated"] is True
    assert again.json()["signal"] == consumed.json()["signal"]
    assert wait_final(saga.pk, timeout=20).status == "completed"
    refused = client.post(url, {"event": "payment_confirmed", "payload": CONFIRMED}, format="json")
    assert refused.status_code == 409 and refused.json()["status"] == "refused"

    detail = client.get(f"/api/sagas/{saga.pk}/").json()
    wait = next(step for step in detail["steps"] if step["name"] == "confirmation")
    assert (wait["kind"], wait["event"], wait["status"]) == (
        "wait",
        "payment_confirmed",
        "completed",
    )
    missing = client.post(
        "/api/sagas/00000000-0000-0000-0000-000000000000/signals/", body, format="json"
    )
    assert missing.status_code == 404


# -- signed URLs ----------------------------------------------------------------------------------


def test_a_providers_webhook_posts_to_the_signed_url_a_step_made(saga_db):
    """The step hands the provider the URL before the wait; the provider posts its payload
    there, without credentials; sent again (its answer lost) it gets the first answer; another
    payload after the wait is over is refused; a tampered token changes nothing."""
    from rest_framework.test import APIClient

    provider = APIClient()
    saga, _ = services.saga_start(name="pays_by_webhook", input={})
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    url = SagaStep.objects.get(saga=saga, name="charge").output["webhook"]
    assert url.startswith("https://shop.example.com/api/sagas/signals/")
    path = url.removeprefix("https://shop.example.com")

    tampered = path.replace("/signals/", "/signals/x")
    assert provider.post(tampered, CONFIRMED, format="json").status_code == 404
    first = provider.post(path, CONFIRMED, format="json")
    assert first.status_code == 200 and first.json()["status"] == "consumed", first.content
    again = provider.post(path, CONFIRMED, format="json")
    assert again.status_code == 200 and again.json()["repeated"] is True
    assert wait_final(saga.pk, timeout=20).status == "completed"
    other = provider.post(path, {"reference": "another"}, format="json")
    assert other.status_code == 409 and other.json()["status"] == "refused"
    assert SagaStep.objects.get(saga=saga, name="ship").output == {"confirmed": CONFIRMED}


def test_a_url_made_before_a_sweepers_resend_still_reaches_the_wait(saga_db, monkeypatch):
    from rest_framework.test import APIClient

    from sagas.signing import signal_path

    lose_messages(monkeypatch)
    saga, _ = services.saga_start(name="pays_by_webhook", input={})
    path = signal_path(saga.pk, "payment_confirmed")  # before the saga ran anything
    monkeypatch.undo()
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    assert sweep().recovered == [str(saga.pk)]  # a new chain, a new epoch
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    answer = APIClient().post(path, CONFIRMED, format="json")
    assert answer.status_code == 200, answer.content
    assert wait_final(saga.pk, timeout=20).status == "completed"


# -- found by review: each failed before its fix ------------------------------------------------


def test_a_signal_kept_while_busy_before_the_timeout_wins_over_it(saga_db, monkeypatch):
    """Kept (202) while a step held the saga, then the wait falls due before the next sweep:
    the signal came in time, and is consumed, not discarded by the timeout."""
    from tests.conftest import attempt_in_process

    lose_messages(monkeypatch)
    saga = start(order="o-in-time")
    assert attempt_in_process(saga.pk, 0) == "done"
    with locked_elsewhere(saga):
        kept = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert kept.status == "kept"
    row = SagaSignal.objects.get(pk=kept.signal_id)
    SagaStep.objects.filter(saga=saga, name="confirmation").update(
        due_at=row.created_at + timedelta(milliseconds=1)
    )
    monkeypatch.undo()
    sweep()
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert SagaSignal.objects.get(pk=row.pk).status == "consumed"


def test_the_sweep_applies_a_busy_signal_behind_signals_kept_for_later_waits(monkeypatch):
    """Sagas with signals kept early for their second wait do not hide, batch after batch, a
    saga whose signal for its current wait came while it was busy."""
    from sagas.engine import waits

    lose_messages(monkeypatch)
    victim, _ = services.saga_start(name="two_waits", input={})
    wait_for(lambda: waiting(victim), timeout=5)
    with locked_elsewhere(victim):
        assert services.saga_signal(saga_id=victim.pk, event="first").status == "kept"
    for _ in range(4):
        other, _ = services.saga_start(name="two_waits", input={})
        assert services.saga_signal(saga_id=other.pk, event="second").status == "kept"
    assert waits.apply_kept(batch_size=2) == 1
    assert SagaStep.objects.get(saga=victim, name="first_wait").status == "completed"


def test_a_resumed_compensation_undoes_a_half_step_after_a_wait(saga_db, monkeypatch):
    """`compensate_failed_step` after a completed wait: halted, then resumed, the compensation
    still undoes it (a completed wait is not the step that was in progress)."""
    from tests.conftest import attempt_in_process

    lose_messages(monkeypatch)
    saga, _ = services.saga_start(name="half_step_after_a_wait", input={})
    assert attempt_in_process(saga.pk, 0) == "done"
    assert services.saga_signal(saga_id=saga.pk, event="go").status == "consumed"
    assert attempt_in_process(saga.pk, 2) == "fail"
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=2))
    assert sweeper.sweep(stale_after=timedelta(minutes=1), max_recoveries=0).dead_lettered
    plan = services.saga_plan(saga_id=saga.pk, action="retry")
    assert plan.undo == ("b", "a"), plan


def test_a_signal_while_busy_for_a_wait_that_is_over_is_refused_and_never_applied(
    saga_db, monkeypatch
):
    """The wait paused at its timeout; a signal while something holds the saga is refused
    (and stored so), as without contention, and a retry's new wait does not consume it."""
    from sagas.engine import waker
    from tests.conftest import attempt_in_process

    lose_messages(monkeypatch)
    saga = start("waits_briefly_then_pauses", order="o-over")
    assert attempt_in_process(saga.pk, 0) == "done"
    SagaStep.objects.filter(saga=saga, name="confirmation").update(due_at=timezone.now())
    waker.time_out_due()
    assert status(saga) == "failed"
    with locked_elsewhere(saga):
        busy = services.saga_signal(
            saga_id=saga.pk, event="payment_confirmed", payload={"reference": "late"}
        )
    assert busy.status == "refused" and "over" in busy.reason
    assert SagaSignal.objects.get(pk=busy.signal_id).status == "refused"
    services.saga_retry(saga_id=saga.pk, actor="operator")
    assert SagaStep.objects.get(saga=saga, name="confirmation").status == "waiting"


def test_a_repeated_key_while_a_compensation_holds_the_saga_gets_the_first_answer(
    saga_db, monkeypatch
):
    from tests.conftest import attempt_in_process

    lose_messages(monkeypatch)
    saga = start(order="o-repeat-busy")
    assert attempt_in_process(saga.pk, 0) == "done"
    failure = {"code": "declined", "message": "3-D Secure failed."}
    first = services.saga_signal(
        saga_id=saga.pk, event="payment_confirmed", idempotency_key="evt-1", fail=failure
    )
    assert first.status == "consumed" and status(saga) == "compensating"
    with locked_elsewhere(saga):
        again = services.saga_signal(
            saga_id=saga.pk, event="payment_confirmed", idempotency_key="evt-1", fail=failure
        )
    assert again.repeated and (again.status, again.signal_id) == (first.status, first.signal_id)


def test_text_postgresql_cannot_store_is_a_400_not_a_500(saga_db):
    from django.contrib.auth.models import Permission
    from rest_framework.test import APIClient

    from tests.factories import make_operator

    operator = make_operator()
    operator.user_permissions.add(Permission.objects.get(codename="signal_saga"))
    client = APIClient()
    client.force_authenticate(type(operator).objects.get(pk=operator.pk))
    saga = start(order="o-nul")
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    url = f"/api/sagas/{saga.pk}/signals/"
    for body in (
        '{"event": "payment_confirmed", "payload": {"reference": "a\\u0000b"}}',
        '{"event": "payment_confirmed", "payload": {"reference": "x", "k\\u0000": 1}}',
        '{"event": "payment_confirmed", "payload": {"reference": "\\ud800"}}',
        '{"event": 5}',
        '{"event": "payment_confirmed", "idempotency_key": 5}',
    ):
        answer = client.post(url, body, content_type="application/json")
        assert answer.status_code == 400, (body, answer.status_code, answer.content)
    assert not SagaSignal.objects.exists() and waiting(saga)


def test_signals_racing_a_bulk_compensation_each_saga_ends_one_way(saga_db):
    """A bulk compensation of waiting sagas while their confirmations arrive: under each
    saga's lock exactly one wins. A saga the signal reached first completes and the bulk
    action skips it; one the bulk action reached first is compensated and its signal refused
    (or, kept while the bulk action held it, discarded): never both, nothing applied twice."""
    from sagas.bulk import BulkFilter
    from sagas.models import BulkAction

    sagas = [start(order=f"o-race-{i}") for i in range(6)]
    for saga in sagas:
        wait_for(lambda saga=saga: waiting(saga), timeout=20, what="the sagas to wait")
    outcomes: dict = {}

    def confirm_all() -> None:
        try:
            for saga in reversed(sagas):  # meeting the bulk action's batch halfway
                outcomes[saga.pk] = services.saga_signal(
                    saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED
                )
        finally:
            connection.close()

    sender = threading.Thread(target=confirm_all)
    sender.start()
    services.bulk_action_start(
        action="compensate",
        bulk_filter=BulkFilter(status="waiting", name="waits_for_payment"),
        actor="operator",
    )
    sender.join()
    finals = {saga.pk: wait_final(saga.pk, timeout=30) for saga in sagas}
    wait_for(
        lambda: BulkAction.objects.get().status == "completed", timeout=30, what="the bulk action"
    )
    for pk, final in finals.items():
        consumed = SagaSignal.objects.filter(saga_id=pk, status="consumed").count()
        if final.status == "completed":
            assert consumed == 1 and outcomes[pk].status == "consumed", pk
        else:
            assert final.status == "compensated", (pk, final.status)
            assert consumed == 0, pk
            assert outcomes[pk].status in ("refused", "kept"), (pk, outcomes[pk])
            assert not SagaSignal.objects.filter(saga_id=pk, status="kept").exists()
    bulk = BulkAction.objects.get()
    compensated = sum(final.status == "compensated" for final in finals.values())
    assert (bulk.done, bulk.skipped) == (compensated, len(sagas) - compensated)
