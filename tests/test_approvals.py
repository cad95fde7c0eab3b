"""Approvals (a person's decision, by `sagas.approve_saga`), a wait's condition and a timer
until a time the saga computes. Real workers run the steps (`saga_db`)."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from sagas import services
from sagas.engine import waits, waker
from sagas.exceptions import SignalError
from sagas.models import EventKind, Saga, SagaEvent, SagaSignal, SagaStep
from tests.conftest import wait_final, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def start(name: str = "needs_approval", order: str = "o-1", **input):
    saga, _ = services.saga_start(name=name, input={"order": order, **input})
    return saga


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def waiting(saga) -> None:
    wait_for(lambda: status(saga) == "waiting", timeout=20, what="the saga to wait")


def events(saga, kind: str) -> list[dict]:
    return list(SagaEvent.objects.filter(saga=saga, kind=kind).values_list("detail", flat=True))


def test_an_approval_lets_the_saga_go_on_and_says_who_decided(saga_db):
    saga = start()
    waiting(saga)
    outcome = services.saga_approve(saga_id=saga.pk, actor="alice", note="looks fine")
    assert (outcome.status, outcome.stage) == ("consumed", "review")
    assert wait_final(saga.pk, timeout=20).status == "completed"
    review = SagaStep.objects.get(saga=saga, name="review")
    assert review.output == {"decision": "approved", "by": "alice", "note": "looks fine"}
    [done] = events(saga, EventKind.WAIT_COMPLETED)
    assert (done["decision"], done["by"], done["note"]) == ("approved", "alice", "looks fine")


def test_a_rejection_compensates_and_the_timeline_says_who_rejected(saga_db):
    saga = start()
    waiting(saga)
    outcome = services.saga_reject(saga_id=saga.pk, actor="bob", note="fraud suspected")
    assert outcome.status == "consumed"
    final = wait_final(saga.pk, timeout=20)
    assert (final.status, final.error_code) == ("compensated", "approval_rejected")
    [failed] = events(saga, EventKind.WAIT_FAILED)
    decided = (failed["decision"], failed["by"], failed["note"])
    assert decided == ("rejected", "bob", "fraud suspected")
    assert SagaStep.objects.get(saga=saga, name="reserve").status == "compensated"
    assert SagaStep.objects.get(saga=saga, name="ship").status == "pending"


def test_the_same_decision_twice_gets_the_first_answer_and_the_other_is_refused(saga_db):
    saga = start()
    waiting(saga)
    first = services.saga_approve(saga_id=saga.pk, actor="alice")
    again = services.saga_approve(saga_id=saga.pk, actor="alice")
    assert again.repeated and again.signal_id == first.signal_id
    other = services.saga_reject(saga_id=saga.pk, actor="bob", note="too late")
    assert other.status == "refused"
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert SagaSignal.objects.filter(saga=saga, status="consumed").count() == 1
    assert events(saga, EventKind.SIGNAL_REFUSED)


def test_approve_and_reject_at_the_same_moment_exactly_one_decides(saga_db):
    saga = start()
    waiting(saga)
    outcomes: list = []
    barrier = threading.Barrier(2)

    def decide(approve: bool) -> None:
        from django.db import connection

        barrier.wait()
        try:
            if approve:
                outcomes.append(services.saga_approve(saga_id=saga.pk, actor="a"))
            else:
                outcomes.append(services.saga_reject(saga_id=saga.pk, actor="b"))
        finally:
            connection.close()

    threads = [threading.Thread(target=decide, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o.status for o in outcomes) == ["consumed", "refused"]
    final = wait_final(saga.pk, timeout=20)
    won = next(o for o in outcomes if o.status == "consumed")
    decision = SagaSignal.objects.get(pk=won.signal_id).payload["decision"]
    assert final.status == ("completed" if decision == "approved" else "compensated")


def test_a_plain_signal_cannot_decide_an_approval(saga_db):
    saga = start()
    waiting(saga)
    with pytest.raises(SignalError, match="approval"):
        services.saga_signal(saga_id=saga.pk, event="review", payload={"decision": "approved"})
    with pytest.raises(ValidationError):
        services.saga_approve(saga_id=saga.pk, actor="alice", note="nul \x00 here")
    assert status(saga) == "waiting"
    assert not SagaSignal.objects.filter(saga=saga).exists()


def test_a_decision_before_the_saga_reaches_its_approval_is_refused_and_changes_nothing(
    saga_db, monkeypatch
):
    from tests.conftest import lose_messages

    lose_messages(monkeypatch)
    saga = start(order="o-early")
    with pytest.raises(waits.NotWaiting):
        services.saga_approve(saga_id=saga.pk, actor="alice")
    assert not SagaSignal.objects.filter(saga=saga).exists()


def test_a_decision_after_an_abort_is_refused_and_recorded_not_early(saga_db):
    """An abort ends the approval as pending again: a decision then is late (the saga never
    goes forward again), refused and on the timeline, not `NotWaiting`."""
    saga = start(order="o-aborted")
    waiting(saga)
    services.saga_compensate(saga_id=saga.pk, actor="operator")
    assert wait_final(saga.pk, timeout=20).status == "compensated"
    outcome = services.saga_approve(saga_id=saga.pk, actor="alice")
    assert (outcome.status, outcome.reason) == ("refused", "The saga is compensated.")
    assert SagaSignal.objects.get(pk=outcome.signal_id).status == "refused"
    [refused] = events(saga, EventKind.SIGNAL_REFUSED)
    assert refused["signal"] == outcome.signal_id


def test_an_approval_whose_condition_is_false_is_skipped(saga_db):
    small = start("reviews_big_orders", order="small", total=20)
    big = start("reviews_big_orders", order="big", total=500)
    assert wait_final(small.pk, timeout=20).status == "completed"
    assert events(small, EventKind.WAIT_SKIPPED) == [{"reason": "its condition was false"}]
    waiting(big)
    services.saga_approve(saga_id=big.pk, actor="alice")
    assert wait_final(big.pk, timeout=20).status == "completed"
    assert not events(big, EventKind.WAIT_SKIPPED)
    # The approval's chain ran the shipping, once.
    shipped = SagaEvent.objects.filter(saga=big, kind=EventKind.STEP_COMPLETED, step_name="ship")
    assert shipped.count() == 1


def test_a_condition_that_raises_pauses_the_saga_with_a_safe_error(saga_db):
    saga = start("broken_condition")
    final = wait_final(saga.pk, timeout=20)
    assert final.error_code == "wait_not_begun"
    assert "KeyError" in final.error_message and "no such field" not in final.error_message
    assert SagaStep.objects.get(saga=saga, name="reserve").status == "completed"
    services.saga_retry(saga_id=saga.pk, actor="op")  # not fixed yet: paused again
    assert Saga.objects.get(pk=saga.pk).error_code == "wait_not_begun"
    fixed = {"tests.sagadefs.a_broken_condition": "tests.sagadefs.is_a_big_order"}
    with override_settings(SAGAS_RENAMED_CALLABLES=fixed):  # the fix, deployed
        services.saga_retry(saga_id=saga.pk, actor="op")  # the retry asks the condition again
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert events(saga, EventKind.WAIT_SKIPPED)


def test_a_timer_until_a_time_the_saga_computes(saga_db):
    soon = timezone.now() + timedelta(seconds=1)
    saga = start("waits_until_told", until=soon.isoformat())
    waiting(saga)
    hold = SagaStep.objects.get(saga=saga, name="hold")
    assert abs((hold.due_at - soon).total_seconds()) < 0.01
    wait_for(lambda: timezone.now() > soon, timeout=5, what="the due time")
    waker.time_out_due()
    assert wait_final(saga.pk, timeout=20).status == "completed"


def test_a_timer_until_a_time_already_past_goes_on_at_once(saga_db):
    past = timezone.now() - timedelta(minutes=5)
    saga = start("waits_until_told", until=past.isoformat())
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert events(saga, EventKind.WAIT_TIMED_OUT)


def test_the_api_decides_for_users_with_the_permission_only(saga_db, monkeypatch):
    from django.contrib.auth.models import Permission, User
    from rest_framework.test import APIClient

    from tests.conftest import lose_messages

    approver = User.objects.create_user("approver", password="x")  # not staff
    client = APIClient()
    client.force_authenticate(approver)
    saga = start(order="o-api")
    waiting(saga)
    url = f"/api/sagas/{saga.pk}/approve/"
    assert client.post(url, {"note": "ok"}, format="json").status_code in (403, 404)
    approver.user_permissions.add(Permission.objects.get(codename="approve_saga"))
    approver = User.objects.get(pk=approver.pk)  # permissions are cached
    client.force_authenticate(approver)
    for bad, field in [
        ({"note": 7}, "note"),
        ({"note": "x" * 1001}, "note"),
        ({"note": "nul \x00 here"}, "note"),
        ({"stage": "nope"}, "stage"),
        ({"colour": "blue"}, "colour"),
    ]:
        answer = client.post(url, bad, format="json")
        assert answer.status_code == 400, (bad, answer.content)
        assert field in answer.json(), (bad, answer.json())
    for hostile in (["a list"], "a string", 7):
        assert client.post(url, hostile, format="json").status_code == 400
    surrogate = '{"note": "lone \\ud800 surrogate"}'  # JSON may spell what UTF-8 cannot
    answer = client.post(url, surrogate, content_type="application/json")
    assert answer.status_code == 400 and "note" in answer.json()
    assert status(saga) == "waiting" and not SagaSignal.objects.exists()
    detail = client.get(f"/api/sagas/{saga.pk}/")  # an approver is not staff: not theirs
    assert detail.status_code == 404
    approver.is_staff = True
    approver.save()
    detail = client.get(f"/api/sagas/{saga.pk}/").json()
    shown = detail["waiting"]
    assert (shown["stage"], shown["kind"], shown["event"]) == ("review", "approval", "review")
    assert shown["since"] and shown["until"]
    assert [s["kind"] for s in detail["steps"]] == ["step", "approval", "step"]

    approved = client.post(url, {"note": "ok"}, format="json")
    assert approved.status_code == 200, approved.content
    assert approved.json()["status"] == "consumed" and approved.json()["stage"] == "review"
    again = client.post(url, {"note": "ok"}, format="json")
    assert again.status_code == 200 and again.json()["repeated"] is True
    rejected = client.post(f"/api/sagas/{saga.pk}/reject/", {}, format="json")
    assert rejected.status_code == 409 and rejected.json()["status"] == "refused"
    assert wait_final(saga.pk, timeout=20).status == "completed"
    [done] = events(saga, EventKind.WAIT_COMPLETED)
    assert done["by"] == "approver"
    assert client.get(f"/api/sagas/{saga.pk}/").json()["waiting"] is None

    lose_messages(monkeypatch)  # a saga not at its approval yet: 409, nothing stored
    early = start(order="o-early")
    answer = client.post(f"/api/sagas/{early.pk}/reject/", {}, format="json")
    assert answer.status_code == 409, answer.content
    assert not SagaSignal.objects.filter(saga=early).exists()


def test_a_conditional_wait_ended_at_once_by_a_kept_signal_then_a_failing_step(
    saga_db, monkeypatch
):
    """A signal kept before the saga reached its conditional wait ends the wait as it begins;
    the step after it declines: the saga compensates at once (one chain carries the step:
    no message of another chain runs it, whose error callback would be an older chain's)."""
    from tests.conftest import lose_messages

    lose_messages(monkeypatch)  # the start's chain is held back: the signal comes first
    saga = start("waits_if_told_then_declines")
    assert services.saga_signal(saga_id=saga.pk, event="go", payload={}).status == "kept"
    monkeypatch.undo()
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    from sagas.engine import sweeper

    assert sweeper.sweep(stale_after=timedelta(minutes=1)).recovered == [str(saga.pk)]
    final = wait_final(saga.pk, timeout=20)  # not the sweeper's 120 s later
    assert (final.status, final.error_code) == ("compensated", "declined")
    failed = SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_FAILED, step_name="b")
    assert failed.count() == 1
    assert SagaStep.objects.get(saga=saga, name="w").status == "completed"


def test_a_kept_signal_survives_a_condition_that_raised_until_its_fix(saga_db, tmp_path):
    """A signal sent before the saga reached its wait is never lost: not when the wait's
    condition raised (the wait never began) and the retry after the fix begins it."""
    from sagas.models import SagaSignal
    from tests.conftest import lose_messages

    fixed = tmp_path / "fixed"
    with pytest.MonkeyPatch.context() as held:
        lose_messages(held)  # the start's chain held back: the signal comes first
        saga = start("condition_fixed_later", fixed=str(fixed))
        kept = services.saga_signal(saga_id=saga.pk, event="go", payload={"n": 1})
    assert kept.status == "kept"
    from sagas.engine import sweeper

    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))
    sweeper.sweep(stale_after=timedelta(minutes=1))
    wait_for(lambda: status(saga) == "failed", timeout=20, what="the condition to raise")
    fixed.touch()  # the fix, deployed
    services.saga_retry(saga_id=saga.pk, actor="op")
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert SagaSignal.objects.get(pk=kept.signal_id).status == "consumed"


def test_the_same_decision_twice_at_the_same_moment_gets_the_first_answer(saga_db):
    from tests.test_bulk import locked_elsewhere

    saga = start(order="o-double")
    waiting(saga)
    outcomes: list = []

    def approve() -> None:
        from django.db import connection

        try:
            outcomes.append(services.saga_approve(saga_id=saga.pk, actor="alice"))
        finally:
            connection.close()

    with locked_elsewhere(saga):  # both wait for the saga's lock, then go one after the other
        threads = [threading.Thread(target=approve) for _ in range(2)]
        for thread in threads:
            thread.start()
        wait_for(lambda: _waiting_for_the_lock() >= 2, timeout=10, what="both at the lock")
    for thread in threads:
        thread.join()
    assert sorted((o.status, o.repeated) for o in outcomes) == [
        ("consumed", False),
        ("consumed", True),
    ]
    assert not events(saga, EventKind.SIGNAL_REFUSED)
    assert wait_final(saga.pk, timeout=20).status == "completed"


def _waiting_for_the_lock() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
        return int(cursor.fetchone()[0])
