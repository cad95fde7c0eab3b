"""Waiting sagas in the admin: the list's waiting column and filter, the saga page's wait,
approve and reject behind their preview, the signal form, and the operator actions on waiting
sagas. Real workers run the steps (`saga_db`)."""

from __future__ import annotations

import html
import re
from datetime import datetime

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from sagas import services
from sagas.engine import waker
from sagas.models import BulkAction, EventKind, Saga, SagaEvent, SagaSignal, SagaStep
from tests.conftest import lose_messages, wait_final, wait_for
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db(transaction=True)

CHANGELIST = reverse("admin:sagas_saga_changelist")
BULK_PAGE = reverse("admin:sagas_saga_bulk")
CONFIRMATION = "admin/sagas/saga/action_confirmation.html"


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def start(name: str = "waits_for_payment", order: str = "o-1", **input) -> Saga:
    saga, _ = services.saga_start(name=name, input={"order": order, **input})
    return saga


def status(saga: Saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def waiting(*sagas: Saga) -> None:
    wait_for(
        lambda: all(status(saga) == "waiting" for saga in sagas),
        timeout=30,
        what="the sagas to wait",
    )


def detail_url(saga: Saga) -> str:
    return reverse("admin:sagas_saga_change", args=[saga.pk])


def decision_url(saga: Saga, action: str) -> str:
    return reverse(f"admin:sagas_saga_{action}", args=[saga.pk])


def signal_url(saga: Saga) -> str:
    return reverse("admin:sagas_saga_signal", args=[saga.pk])


def messages_of(response) -> list[str]:
    """The messages of the response's request: those it added, and those that no page showed
    yet (a redirect followed, `follow=True`, shows them)."""
    return [str(message) for message in get_messages(response.wsgi_request)]


def staff_with(*codenames: str):
    user = UserFactory(is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


def logged_in(user, client: Client | None = None) -> Client:
    client = client or Client()
    client.force_login(user)
    return client


def confirm(page) -> dict:
    """The confirmation page's form, confirmed (with its one-time token)."""
    return {"post": "yes", "_once": page.context["once"]}


def events(saga: Saga, kind: str) -> list[dict]:
    return list(SagaEvent.objects.filter(saga=saga, kind=kind).values_list("detail", flat=True))


# -- the list and the saga page ------------------------------------------------------------------


def test_the_list_filters_the_waiting_sagas_and_says_what_each_waits_for(saga_db, admin_client):
    payment = start(order="o-pay")
    approval = start("needs_approval", order="o-review")
    undecided = start("approval_without_timeout", order="o-undecided")
    done = start("three_steps")
    waiting(payment, approval, undecided)
    assert wait_final(done.pk).status == "completed"

    everything = admin_client.get(CHANGELIST)
    assert "?status__exact=waiting" in everything.content.decode()  # the status filter's choice
    listed = admin_client.get(CHANGELIST, {"status__exact": "waiting"})
    shown = {saga.pk for saga in listed.context["cl"].result_list}
    assert shown == {payment.pk, approval.pk, undecided.pk}
    html = listed.content.decode()
    assert "Waiting for / until" in html
    due = SagaStep.objects.get(saga=payment, name="confirmation").due_at
    assert "event payment_confirmed" in html
    assert f"until {timezone.localtime(due):%Y-%m-%d %H:%M:%S}" in html
    assert "approval review" in html
    assert html.count("until an operator decides") == 1  # the approval with no timeout

    page = admin_client.get(detail_url(undecided)).content.decode()
    assert "saga-wait-facts" in page and "the approval <strong>review</strong>" in page
    assert "until an operator decides: it has no timeout" in page
    page = admin_client.get(detail_url(payment)).content.decode()
    assert "the event <code>payment_confirmed</code>" in page
    assert "then the saga compensates" in page and "Since" in page
    # A saga that does not wait has no such section.
    assert "saga-wait-facts" not in admin_client.get(detail_url(done)).content.decode()


def test_the_waiting_column_costs_no_query_per_saga(saga_db, admin_client):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            response = admin_client.get(CHANGELIST, {"status__exact": "waiting"})
        assert response.status_code == 200
        return len(captured.captured_queries)

    first = start(order="o-0")
    waiting(first)
    admin_client.get(CHANGELIST)  # the session's first request loads the user
    one = queries()
    more = [
        start(order=f"o-{i}") if i % 2 else start("needs_approval", f"o-{i}") for i in range(1, 20)
    ]
    waiting(*more)
    twenty = queries()
    assert one == twenty, f"1 waiting saga: {one} queries, 20: {twenty}"
    html = admin_client.get(CHANGELIST, {"status__exact": "waiting"}).content.decode()
    assert html.count("saga-wait-until") == 20


# -- approve and reject --------------------------------------------------------------------------


def test_an_approver_approves_from_the_saga_page_after_its_preview(saga_db):
    approver = staff_with("view_saga", "approve_saga")
    client = logged_in(approver)
    saga = start("needs_approval")
    waiting(saga)

    page = client.get(detail_url(saga))
    decisions = [(words.name, url) for words, url in page.context["saga_decisions"]]
    assert decisions == [
        ("approve_sagas", decision_url(saga, "approve")),
        ("reject_sagas", decision_url(saga, "reject")),
    ]
    assert page.context["saga_operator_actions"] == []  # no retry or compensate permission

    preview = client.get(decision_url(saga, "approve"))
    assert CONFIRMATION in [t.name for t in preview.templates]
    (planned,) = preview.context["previews"]
    assert planned.plan.allowed and planned.plan.run == ("ship",) and planned.plan.undo == ()
    assert 'name="note"' in preview.content.decode()
    assert status(saga) == "waiting"  # a preview decides nothing

    form = {**confirm(preview), "note": "looks fine"}
    done = client.post(decision_url(saga, "approve"), form, follow=True)
    assert done.redirect_chain == [(detail_url(saga), 302)]
    assert messages_of(done) == ["Approved 1 saga."]
    assert wait_final(saga.pk).status == "completed"
    review = SagaStep.objects.get(saga=saga, name="review")
    assert review.output == {"decision": "approved", "by": approver.username, "note": "looks fine"}

    # The same confirmation sent again: nothing more; a new one: the decision was taken.
    again = client.post(decision_url(saga, "approve"), form, follow=True)
    assert "This confirmation was sent before" in messages_of(again)[0]
    anew = client.post(
        decision_url(saga, "approve"), {"post": "yes", "_once": "a" * 32}, follow=True
    )
    assert messages_of(anew) == [
        f"Saga {saga.pk}: this decision was taken before; nothing more was done."
    ]
    # The other decision, after the approval is over: refused, said, recorded; no 500.
    late = client.get(decision_url(saga, "reject"))
    assert not late.context["previews"][0].plan.allowed
    refused = client.post(decision_url(saga, "reject"), confirm(late), follow=True)
    assert refused.redirect_chain == [(detail_url(saga), 302)]
    (message,) = messages_of(refused)
    assert message.startswith(f"Saga {saga.pk} was not changed: the decision was refused.")
    assert SagaSignal.objects.filter(saga=saga, status="consumed").count() == 1
    assert events(saga, EventKind.SIGNAL_REFUSED)


def test_a_rejection_previews_the_compensations_and_compensates(saga_db):
    approver = staff_with("view_saga", "approve_saga")
    client = logged_in(approver)
    saga = start("needs_approval")
    waiting(saga)

    preview = client.get(decision_url(saga, "reject"))
    (planned,) = preview.context["previews"]
    assert planned.plan.allowed and planned.plan.undo == ("reserve",) and planned.plan.run == ()
    too_long = client.post(decision_url(saga, "reject"), {**confirm(preview), "note": "x" * 1001})
    assert too_long.status_code == 200 and too_long.context["decision_form"].errors
    assert status(saga) == "waiting"

    done = client.post(decision_url(saga, "reject"), {**confirm(preview), "note": "fraud"})
    assert messages_of(done) == ["Rejected 1 saga."]
    final = wait_final(saga.pk)
    assert (final.status, final.error_code) == ("compensated", "approval_rejected")
    [failed] = events(saga, EventKind.WAIT_FAILED)
    assert (failed["decision"], failed["by"], failed["note"]) == (
        "rejected",
        approver.username,
        "fraud",
    )


def test_a_rejection_past_the_pivot_previews_a_pause(saga_db, admin_client):
    saga = start("approval_after_pivot")
    waiting(saga)
    (planned,) = admin_client.get(decision_url(saga, "reject")).context["previews"]
    assert planned.plan.allowed and planned.plan.undo == ()
    assert "pauses for an operator" in planned.plan.reason


def test_the_list_actions_decide_and_say_which_sagas_they_could_not(saga_db, admin_client):
    review = start("needs_approval", order="o-review")
    payment = start(order="o-pay")
    waiting(review, payment)
    selected = {"action": "approve_sagas", "_selected_action": [str(review.pk), str(payment.pk)]}

    page = admin_client.post(CHANGELIST, {**selected, "index": "0"})
    assert CONFIRMATION in [t.name for t in page.templates]
    plans = {preview.saga.pk: preview.plan for preview in page.context["previews"]}
    assert plans[review.pk].allowed and plans[review.pk].run == ("ship",)
    assert not plans[payment.pk].allowed and plans[payment.pk].reason == "The saga has no approval."

    done = admin_client.post(CHANGELIST, {**selected, **confirm(page), "note": "batch"})
    assert done.status_code == 302
    shown = messages_of(done)
    assert "Approved 1 saga." in shown
    assert any(m.startswith(f"Saga {payment.pk} was not changed:") for m in shown)
    assert wait_final(review.pk).status == "completed"
    assert status(payment) == "waiting"


def test_a_decision_before_the_saga_reaches_its_approval_is_an_error_message(
    saga_db, admin_client, monkeypatch
):
    lose_messages(monkeypatch)  # the saga never gets past its first step
    saga = start("needs_approval", order="o-early")
    page = admin_client.get(decision_url(saga, "approve"))
    (planned,) = page.context["previews"]
    assert not planned.plan.allowed
    assert planned.plan.reason == "The saga has not reached review yet."
    answer = admin_client.post(decision_url(saga, "approve"), confirm(page))
    assert answer.status_code == 302 and answer["Location"] == detail_url(saga)
    (message,) = messages_of(answer)
    assert "not waiting for the approval 'review' yet" in message
    assert not SagaSignal.objects.filter(saga=saga).exists()
    assert admin_client.get(detail_url(saga)).context["saga_decisions"] == []


def test_deciding_needs_the_permission_and_the_csrf_token(saga_db):
    saga = start("needs_approval")
    waiting(saga)
    viewer = logged_in(staff_with("view_saga", "signal_saga", "retry_saga"))
    page = viewer.get(detail_url(saga))
    assert page.context["saga_decisions"] == []
    assert decision_url(saga, "approve") not in page.content.decode()
    choices = dict(viewer.get(CHANGELIST).context["action_form"].fields["action"].choices)
    assert "approve_sagas" not in choices and "reject_sagas" not in choices
    for action in ("approve", "reject"):
        assert viewer.get(decision_url(saga, action)).status_code == 403
        posted = viewer.post(decision_url(saga, action), {"post": "yes", "_once": "b" * 32})
        assert posted.status_code == 403
    listed = viewer.post(CHANGELIST, {"action": "approve_sagas", "_selected_action": [saga.pk]})
    assert CONFIRMATION not in [t.name for t in listed.templates]

    approver = staff_with("view_saga", "approve_saga")
    strict = logged_in(approver, Client(enforce_csrf_checks=True))
    assert strict.get(decision_url(saga, "approve")).status_code == 200
    forged = strict.post(decision_url(saga, "approve"), {"post": "yes", "_once": "c" * 32})
    assert forged.status_code == 403
    assert status(saga) == "waiting" and not SagaSignal.objects.filter(saga=saga).exists()


# -- the signal form -----------------------------------------------------------------------------


def signal_form(**fields: str) -> dict:
    return {"event": "payment_confirmed", "payload": "", "idempotency_key": "", **fields}


def sent_form(preview) -> dict:
    """The preview page's hidden fields, and its Send button."""
    page = preview.content.decode()
    form = page[page.index('class="saga-confirm"') :]
    fields = dict(re.findall(r'<input type="hidden" name="(\w+)" value="([^"]*)"', form))
    return {**{name: html.unescape(value) for name, value in fields.items()}, "_send": "1"}


def test_the_signal_form_previews_then_sends_the_signal(saga_db):
    signaller = staff_with("view_saga", "signal_saga")
    client = logged_in(signaller)
    saga = start()
    waiting(saga)
    assert client.get(detail_url(saga)).context["saga_signal_url"] == signal_url(saga)

    page = client.get(signal_url(saga))
    assert page.status_code == 200
    assert list(page.context["form"].fields["event"].choices) == [
        ("payment_confirmed", "payment_confirmed")
    ]
    payload = '{"reference": "3ds-1"}'
    preview = client.post(signal_url(saga), signal_form(payload=payload, _preview="1"))
    assert preview.status_code == 200
    assert preview.context["preview"].outcome == "consumed"
    assert preview.context["preview"].plan.run == ("ship",)
    assert preview.context["send_key"].startswith("admin-")
    assert not SagaSignal.objects.exists()  # a preview stores nothing

    form = sent_form(preview)
    sent = client.post(signal_url(saga), form, follow=True)
    assert sent.redirect_chain == [(detail_url(saga), 302)]
    assert messages_of(sent) == ["Signal payment_confirmed sent: it ended the wait confirmation."]
    assert wait_final(saga.pk).status == "completed"
    ship = SagaStep.objects.get(saga=saga, name="ship")
    assert ship.output == {"confirmed": {"reference": "3ds-1"}}
    assert SagaSignal.objects.get(saga=saga).idempotency_key == preview.context["send_key"]

    again = client.post(signal_url(saga), form, follow=True)  # the confirmation sent twice
    assert messages_of(again) == [
        "This signal was sent before (its key): it was consumed, and nothing more was done."
    ]
    assert SagaSignal.objects.filter(saga=saga).count() == 1


def test_a_payload_the_wait_refuses_is_a_form_error_and_stores_nothing(saga_db):
    client = logged_in(staff_with("view_saga", "signal_saga"))
    saga = start()
    waiting(saga)
    for payload, error in [
        ("{not json", "Enter a valid JSON."),
        ('{"other": 1}', "A confirmation has a reference."),
        ('{"reference": "' + "x" * 2000 + '"}', "At most 1000 bytes of JSON"),
        ('{"reference": "nul \\u0000"}', "cannot be stored"),
    ]:
        for step in ("_preview", "_send"):
            answer = client.post(signal_url(saga), signal_form(payload=payload, **{step: "1"}))
            assert answer.status_code == 200, (payload, step)
            assert answer.context["preview"] is None
            assert error in answer.content.decode(), (payload, step)
    bad = signal_form(payload='{"reference": "r"}', idempotency_key="has space", _preview="1")
    answer = client.post(signal_url(saga), bad)
    assert "Printable ASCII, no spaces." in answer.content.decode()
    missing = signal_form(fail="on", fail_code="Bad Code", _preview="1")
    errors = client.post(signal_url(saga), missing).context["form"].errors
    assert set(errors) == {"fail_code", "fail_message"}
    unknown = client.post(signal_url(saga), signal_form(event="nope", _preview="1"))
    assert "nope is not one of the available choices" in unknown.content.decode()
    assert not SagaSignal.objects.exists() and status(saga) == "waiting"


def test_a_signal_that_fails_the_wait_previews_and_runs_the_compensation(saga_db, admin_client):
    saga = start()
    waiting(saga)
    failing = signal_form(fail="on", fail_code="3ds_failed", fail_message="3-D Secure failed")
    preview = admin_client.post(signal_url(saga), {**failing, "_preview": "1"})
    assert preview.context["preview"].outcome == "consumed"
    assert preview.context["preview"].plan.undo == ("reserve",)
    sent = admin_client.post(signal_url(saga), sent_form(preview))
    assert messages_of(sent) == ["Signal payment_confirmed sent: it failed the wait confirmation."]
    final = wait_final(saga.pk)
    assert (final.status, final.error_code) == ("compensated", "3ds_failed")


def test_a_signal_preview_says_kept_or_refused_and_a_refused_one_is_no_500(saga_db, admin_client):
    saga = start("two_waits", order="o-two")
    waiting(saga)
    later = admin_client.post(signal_url(saga), {"event": "second", "_preview": "1"})
    assert later.context["preview"].outcome == "kept"
    assert "Yes, send it" in later.content.decode()
    assert {e for e, _ in later.context["form"].fields["event"].choices} == {"first", "second"}

    services.saga_compensate(saga_id=saga.pk, actor="test")
    assert wait_final(saga.pk).status == "compensated"
    assert "saga_signal_url" not in admin_client.get(detail_url(saga)).context
    over = admin_client.post(signal_url(saga), {"event": "first", "_preview": "1"})
    assert over.context["preview"].outcome == "refused"
    assert "Yes, send it" not in over.content.decode()
    sent = admin_client.post(signal_url(saga), sent_form(over))
    assert sent.status_code == 302
    assert messages_of(sent) == [
        "Signal first refused: The saga is compensated. It is recorded; nothing changed."
    ]
    assert SagaSignal.objects.get(saga=saga).status == "refused"


def test_an_approval_takes_no_signal_from_the_form(saga_db, admin_client):
    saga = start("needs_approval")
    waiting(saga)
    assert "saga_signal_url" not in admin_client.get(detail_url(saga)).context
    answer = admin_client.get(signal_url(saga))
    assert answer.status_code == 302
    assert messages_of(answer) == ["No wait of this saga takes a signal."]


def test_sending_a_signal_needs_the_permission_and_the_csrf_token(saga_db):
    saga = start()
    waiting(saga)
    viewer = logged_in(staff_with("view_saga", "approve_saga"))
    assert "saga_signal_url" not in viewer.get(detail_url(saga)).context
    assert viewer.get(signal_url(saga)).status_code == 403
    payload = '{"reference": "r"}'
    assert viewer.post(signal_url(saga), signal_form(payload=payload, _send="1")).status_code == 403

    strict = logged_in(staff_with("view_saga", "signal_saga"), Client(enforce_csrf_checks=True))
    assert strict.get(signal_url(saga)).status_code == 200
    forged = strict.post(signal_url(saga), signal_form(payload=payload, _send="1"))
    assert forged.status_code == 403
    assert not SagaSignal.objects.exists() and status(saga) == "waiting"


# -- the operator actions on waiting sagas -------------------------------------------------------


def test_an_operator_aborts_a_waiting_saga(saga_db, admin_client):
    saga = start()
    waiting(saga)
    button = {"action": "compensate_sagas", "_selected_action": [saga.pk], "index": "0"}
    page = admin_client.post(CHANGELIST, {**button, "_return_to_detail": "1"})
    (preview,) = page.context["previews"]
    assert preview.plan.allowed and preview.plan.undo == ("reserve",)
    done = admin_client.post(CHANGELIST, {**button, **confirm(page), "_return_to_detail": "1"})
    assert done["Location"] == detail_url(saga)
    assert "Compensating 1 saga." in messages_of(done)
    assert wait_final(saga.pk).status == "compensated"
    wait = SagaStep.objects.get(saga=saga, name="confirmation")
    assert (wait.status, wait.due_at) == ("pending", None)


def test_a_retry_of_a_saga_paused_at_its_timeout_waits_again_with_a_new_due_time(
    saga_db, admin_client
):
    saga = start("waits_briefly_then_pauses")
    waiting(saga)
    first_due = SagaStep.objects.get(saga=saga, name="confirmation").due_at

    def paused() -> bool:
        waker.time_out_due()  # as the wake does
        return status(saga) == "failed"

    wait_for(paused, timeout=30, what="the wait to time out")
    assert Saga.objects.get(pk=saga.pk).error_code == "wait_timed_out"

    selected = {"action": "retry_sagas", "_selected_action": [saga.pk]}
    page = admin_client.post(CHANGELIST, {**selected, "index": "0"})
    (preview,) = page.context["previews"]
    assert preview.plan.allowed and preview.plan.run == ("confirmation", "ship")
    done = admin_client.post(CHANGELIST, {**selected, **confirm(page), "deadline": "keep"})
    assert "Retried 1 saga." in messages_of(done)
    # It waits again (for a second, before the next wake times it out again).
    wait_for(
        lambda: len(events(saga, EventKind.WAIT_STARTED)) == 2,
        timeout=30,
        what="the wait to begin again",
    )
    again = events(saga, EventKind.WAIT_STARTED)[-1]
    assert datetime.fromisoformat(again["until"]) > first_due


def test_a_bulk_compensation_takes_the_waiting_sagas(saga_db, admin_client):
    sagas = [start(order=f"o-{i}") for i in range(3)]
    waiting(*sagas)
    page = admin_client.get(BULK_PAGE, {"status__exact": "waiting"})
    previews = {section.action: section.preview for section in page.context["previews"]}
    assert (previews["compensate"].count, previews["compensate"].allowed) == (3, 3)
    assert (previews["retry"].count, previews["retry"].allowed) == (3, 0)

    posted = {"status": "waiting", "action": "compensate", "expected_count": "3"}
    started = admin_client.post(BULK_PAGE, posted)
    bulk_action = BulkAction.objects.get()
    assert started["Location"] == reverse("admin:sagas_bulkaction_change", args=[bulk_action.pk])
    for saga in sagas:  # the workers run the bulk action's batches
        assert wait_final(saga.pk).status == "compensated"
    wait_for(
        lambda: BulkAction.objects.get().status == "completed",
        timeout=30,
        what="the bulk action to complete",
    )
    bulk_action.refresh_from_db()
    assert (bulk_action.done, bulk_action.skipped, bulk_action.failed) == (3, 0, 0)
