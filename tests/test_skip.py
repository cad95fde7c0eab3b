"""Marking a stage as done by hand (`saga_skip`, `sagas.skip_saga`): a waiting stage, or the
failed stage a paused saga stopped at, with an output later stages read. Real workers run the
steps (`saga_db`)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from rest_framework.test import APIClient

from sagas import services
from sagas.exceptions import InvalidTransition
from sagas.models import EventKind, Saga, SagaEvent, SagaStep
from tests.conftest import wait_final, wait_for
from tests.factories import make_operator

pytestmark = pytest.mark.django_db(transaction=True)

CONFIRMED = {"reference": "by-hand-1"}


def start(name: str, order: str = "o-1"):
    saga, _ = services.saga_start(name=name, input={"order": order})
    return saga


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def reach(saga, wanted: str) -> None:
    wait_for(lambda: status(saga) == wanted, timeout=20, what=f"the saga to be {wanted}")


def skips(saga) -> list[dict]:
    kind = EventKind.OPERATOR_SKIP
    return list(SagaEvent.objects.filter(saga=saga, kind=kind).values_list("detail", flat=True))


def test_a_waiting_stage_marked_as_done_gives_its_output_and_the_saga_goes_on(saga_db):
    saga = start("waits_for_payment")
    reach(saga, "waiting")
    with pytest.raises(ValidationError):  # the wait's validator checks the output
        services.saga_skip(saga_id=saga.pk, index=1, output={"no": "reference"})
    assert status(saga) == "waiting"
    plan = services.saga_plan(saga_id=saga.pk, action="skip", index=1)
    assert plan.allowed and plan.run == ("ship",)
    services.saga_skip(saga_id=saga.pk, index=1, output=CONFIRMED, actor="op", note="phoned")
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert SagaStep.objects.get(saga=saga, name="ship").output == {"confirmed": CONFIRMED}
    [skipped] = skips(saga)
    assert (skipped["actor"], skipped["note"]) == ("op", "phoned")
    late = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert late.status == "refused"  # the event, after it was done by hand


def test_a_wait_that_timed_out_and_paused_is_marked_as_done(saga_db):
    saga = start("waits_briefly_then_pauses")
    reach(saga, "waiting")
    SagaStep.objects.filter(saga=saga, name="confirmation").update(due_at="2000-01-01T00:00Z")
    from sagas.engine import waker

    waker.time_out_due()
    reach(saga, "failed")
    services.saga_skip(saga_id=saga.pk, index=1, output=CONFIRMED, actor="op")
    final = wait_final(saga.pk, timeout=20)
    assert (final.status, final.error_code) == ("completed", "")


def test_the_last_step_that_failed_marked_as_done_completes_the_saga(saga_db):
    saga = start("breaks_at_the_end")
    reach(saga, "failed")
    assert SagaStep.objects.get(saga=saga, name="last").status == "failed"
    with pytest.raises(InvalidTransition):  # not the stage it stopped at
        services.saga_skip(saga_id=saga.pk, index=0, output=None)
    services.saga_skip(saga_id=saga.pk, index=1, output={"done": "by hand"}, actor="op")
    final = Saga.objects.get(pk=saga.pk)
    assert (final.status, final.error_code) == ("completed", "")
    last = SagaStep.objects.get(saga=saga, name="last")
    assert (last.status, last.output, last.error_code) == ("completed", {"done": "by hand"}, "")


def test_what_cannot_be_skipped(saga_db):
    approval = start("needs_approval")
    reach(approval, "waiting")
    with pytest.raises(InvalidTransition, match="approve"):
        services.saga_skip(saga_id=approval.pk, index=1)
    done = start("three_steps")
    assert wait_final(done.pk, timeout=20).status == "completed"
    with pytest.raises(InvalidTransition):
        services.saga_skip(saga_id=done.pk, index=1)
    with pytest.raises(InvalidTransition):
        services.saga_skip(saga_id=done.pk, index=99)
    nul = start("waits_for_payment", order="o-nul")
    reach(nul, "waiting")
    with pytest.raises(ValidationError):
        services.saga_skip(saga_id=nul.pk, index=1, output={"reference": "a \x00 b"})
    assert status(nul) == "waiting" and not skips(nul)


def test_the_api_skips_for_staff_with_the_permission(saga_db):
    operator = make_operator()
    skipping = Permission.objects.get(codename="skip_saga")
    operator.user_permissions.remove(skipping)  # every other operator permission
    operator = type(operator).objects.get(pk=operator.pk)
    client = APIClient()
    client.force_authenticate(operator)
    saga = start("waits_for_payment", order="o-api")
    reach(saga, "waiting")
    url = f"/api/sagas/{saga.pk}/steps/1/skip/"
    body = {"output": CONFIRMED, "note": "confirmed on the phone"}
    assert client.post(url, body, format="json").status_code == 403
    operator.user_permissions.add(skipping)
    operator = type(operator).objects.get(pk=operator.pk)
    client.force_authenticate(operator)
    plan = client.get(f"/api/sagas/{saga.pk}/plan/?action=skip&index=1").json()
    assert plan["allowed"] and plan["run"] == ["ship"]
    assert client.get(f"/api/sagas/{saga.pk}/plan/?action=skip").status_code == 400
    for bad, field in [
        ({"output": {"x": 1}}, "output"),
        ({"output": CONFIRMED, "note": 5}, "note"),
        ({"output": CONFIRMED, "colour": "blue"}, "colour"),
    ]:
        answer = client.post(url, bad, format="json")
        assert answer.status_code == 400 and field in answer.json(), (bad, answer.content)
    assert status(saga) == "waiting"
    answer = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="skip-1")
    assert answer.status_code == 202, answer.content
    again = client.post(url, body, format="json", HTTP_IDEMPOTENCY_KEY="skip-1")
    assert again.status_code == 202 and again["Idempotent-Replayed"] == "true"
    assert wait_final(saga.pk, timeout=20).status == "completed"
    assert client.post(url, body, format="json").status_code == 409
    assert len(skips(saga)) == 1


def test_a_stage_marked_as_done_is_compensated_after_a_halted_compensation(saga_db, tmp_path):
    """The operator said the step happened: a compensation that halts (one step's undo
    fails for good) and is resumed still undoes it."""
    runs = tmp_path / "runs"
    saga, _ = services.saga_start(name="skipped_then_halted", input={"runs": str(runs)})
    reach(saga, "failed")  # b broke
    services.saga_skip(saga_id=saga.pk, index=1, output={"done": "by hand"}, actor="op")
    reach(saga, "failed")  # d declined, then c's compensation failed for good: halted
    assert SagaStep.objects.get(saga=saga, name="c").status == "compensation_failed"
    assert SagaStep.objects.get(saga=saga, name="b").status == "completed"
    services.saga_step_resolve(saga_id=saga.pk, index=2, actor="op")
    assert wait_final(saga.pk, timeout=20).status == "compensated"
    statuses = dict(SagaStep.objects.filter(saga=saga).values_list("name", "status"))
    assert statuses["b"] == "compensated" and statuses["a"] == "compensated", statuses
    assert runs.read_text().splitlines() == ["undo b", "undo a"]


def test_a_signal_kept_while_busy_is_refused_when_its_wait_is_marked_as_done(saga_db):
    from tests.test_bulk import locked_elsewhere

    saga = start("waits_for_payment", order="o-busy")
    reach(saga, "waiting")
    with locked_elsewhere(saga):
        kept = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert kept.status == "kept"
    services.saga_skip(saga_id=saga.pk, index=1, output=CONFIRMED, actor="op")
    from sagas.models import SagaSignal

    row = SagaSignal.objects.get(pk=kept.signal_id)
    assert (row.status, row.reason) == ("refused", "Its wait was marked as done by hand.")
    assert wait_final(saga.pk, timeout=20).status == "completed"


def test_a_note_postgresql_cannot_store_is_refused_before_anything_changes(saga_db):
    saga = start("waits_for_payment", order="o-note")
    reach(saga, "waiting")
    with pytest.raises(ValidationError) as refused:
        services.saga_skip(saga_id=saga.pk, index=1, output=CONFIRMED, note="a \ud800 b")
    assert "note" in refused.value.message_dict
    assert status(saga) == "waiting" and not skips(saga)
