"""Marking a stage as done by hand in the admin: the saga page's "Mark as done…" for the stage
that may be skipped now, its page (the output and a note, a preview, the skip once per
confirmation), its permission and CSRF token; and the bulk skip of a stage over a filter. Real
workers run the steps (`saga_db`)."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from sagas.models import EventKind, Saga, SagaEvent, SagaStep
from tests.conftest import wait_final
from tests.test_admin_waits import (
    detail_url,
    logged_in,
    messages_of,
    sent_form,
    staff_with,
    start,
    status,
    waiting,
)
from tests.test_bulk import locked_elsewhere
from tests.test_skip import reach

pytestmark = pytest.mark.django_db(transaction=True)

CONFIRMED = '{"reference": "by-hand-1"}'


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def skip_url(saga: Saga, index: int) -> str:
    return reverse("admin:sagas_saga_skip", args=[saga.pk, index])


def skips(saga: Saga) -> list[dict]:
    kind = EventKind.OPERATOR_SKIP
    return list(SagaEvent.objects.filter(saga=saga, kind=kind).values_list("detail", flat=True))


def preview(client: Client, saga: Saga, index: int, output: str = CONFIRMED, note: str = ""):
    return client.post(
        skip_url(saga, index), {"output": output, "note": note, "_preview": "Preview"}
    )


def test_the_saga_page_marks_its_waiting_stage_as_done_after_a_preview(saga_db):
    operator = staff_with("view_saga", "skip_saga")
    client = logged_in(operator)
    saga = start()
    waiting(saga)
    page = client.get(detail_url(saga))
    assert page.context["saga_skip_url"] == skip_url(saga, 1)
    assert "Mark as done&hellip;" in page.content.decode()

    form = client.get(skip_url(saga, 1))
    assert form.status_code == 200 and form.context["preview"] is None
    assert set(form.context["form"].fields) == {"output", "note"}
    shown = preview(client, saga, 1, note="Paid by bank transfer, seen on the statement.")
    assert shown.status_code == 200
    plan = shown.context["preview"]
    assert (plan.allowed, plan.run) == (True, ("ship",))
    assert "Yes, mark it as done" in shown.content.decode()
    assert status(saga) == "waiting" and not skips(saga)  # a preview changes nothing

    confirmation = sent_form(shown)
    assert confirmation["post"] == "yes" and len(confirmation["_once"]) == 32
    done = client.post(skip_url(saga, 1), confirmation, follow=True)
    assert done.redirect_chain == [(detail_url(saga), 302)]
    assert messages_of(done) == ["Marked confirmation as done: the saga goes on."]
    assert wait_final(saga.pk).status == "completed"
    assert SagaStep.objects.get(saga=saga, name="confirmation").output == {"reference": "by-hand-1"}
    assert SagaStep.objects.get(saga=saga, name="ship").output == {
        "confirmed": {"reference": "by-hand-1"}
    }
    [detail] = skips(saga)
    assert detail["actor"] == operator.get_username()
    assert detail["note"] == "Paid by bank transfer, seen on the statement."

    again = client.post(skip_url(saga, 1), confirmation, follow=True)  # sent twice
    assert messages_of(again) == [
        "This confirmation was sent before: confirmation was marked as done then, and nothing "
        "was done again."
    ]
    assert len(skips(saga)) == 1
    assert "saga_skip_url" not in client.get(detail_url(saga)).context  # completed


def test_the_failed_stage_of_a_paused_saga_is_offered_and_nothing_else(saga_db, admin_client):
    paused = start("breaks_at_the_end", order="o-paused")
    approval = start("needs_approval", order="o-review")
    reach(paused, "failed")
    waiting(approval)
    assert admin_client.get(detail_url(paused)).context["saga_skip_url"] == skip_url(paused, 1)
    assert "saga_skip_url" not in admin_client.get(detail_url(approval)).context

    # The first stage completed: its page says so, and confirming it changes nothing.
    refused = preview(admin_client, paused, 0, output="")
    assert refused.context["preview"].allowed is False
    page = refused.content.decode()
    assert "Only a waiting stage, or the failed stage a paused saga stopped at" in page
    assert "Yes, mark it as done" not in page
    forced = admin_client.post(skip_url(paused, 0), {"output": "", "post": "yes"}, follow=True)
    assert forced.redirect_chain == [(detail_url(paused), 302)]
    [message] = messages_of(forced)
    assert message.startswith(f"Saga {paused.pk} was not changed: Only a waiting stage")
    approved = preview(admin_client, approval, 1, output="")
    assert "An approval is decided, not skipped" in approved.content.decode()
    assert admin_client.get(skip_url(paused, 7)).status_code == 404

    # The failed last step, marked as done with null: the saga completes.
    shown = preview(admin_client, paused, 1, output="")
    assert (shown.context["preview"].allowed, shown.context["preview"].run) == (True, ())
    done = admin_client.post(skip_url(paused, 1), sent_form(shown), follow=True)
    assert messages_of(done) == ["Marked last as done: the saga completed."]
    final = Saga.objects.get(pk=paused.pk)
    assert (final.status, final.error_code) == ("completed", "")
    assert SagaStep.objects.get(saga=paused, name="last").output is None
    assert status(approval) == "waiting" and not skips(approval)


def test_an_output_the_stage_refuses_is_a_form_error_and_changes_nothing(saga_db, admin_client):
    saga = start()
    waiting(saga)
    for output, error in [
        ("{not json", "Enter a valid JSON."),
        ('{"other": 1}', "A confirmation has a reference."),
        ('{"reference": "' + "x" * 2000 + '"}', "At most 1000 bytes of JSON"),
        ('{"reference": "nul \\u0000"}', "cannot be stored"),
    ]:
        for step in ({"_preview": "Preview"}, {"post": "yes", "_once": "a" * 32}):
            answer = admin_client.post(skip_url(saga, 1), {"output": output, **step})
            assert answer.status_code == 200, (output, step)
            assert answer.context["preview"] is None
            assert error in answer.content.decode(), (output, step)
    long_note = admin_client.post(
        skip_url(saga, 1), {"output": CONFIRMED, "note": "n" * 1001, "_preview": "Preview"}
    )
    assert "at most 1000 characters" in long_note.content.decode()
    assert status(saga) == "waiting" and not skips(saga)


def test_a_busy_saga_is_an_error_message_never_a_500(saga_db, admin_client, monkeypatch):
    monkeypatch.setattr("sagas.engine.operator.LOCK_WAIT", 0.3)
    saga = start()
    waiting(saga)
    shown = preview(admin_client, saga, 1)
    with locked_elsewhere(saga):
        busy = preview(admin_client, saga, 1)
        assert busy.context["preview"] is None
        assert "The saga is busy" in busy.content.decode()
        sent = admin_client.post(skip_url(saga, 1), sent_form(shown), follow=True)
    assert sent.redirect_chain == [(detail_url(saga), 302)]
    assert messages_of(sent) == [
        f"Saga {saga.pk} was not changed: The saga is busy (a step is running); try again shortly."
    ]
    assert status(saga) == "waiting" and not skips(saga)
    done = admin_client.post(skip_url(saga, 1), sent_form(shown), follow=True)  # refused: again
    assert messages_of(done) == ["Marked confirmation as done: the saga goes on."]
    assert wait_final(saga.pk).status == "completed"


def test_marking_as_done_needs_the_permission_and_the_csrf_token(saga_db):
    saga = start()
    waiting(saga)
    viewer = logged_in(staff_with("view_saga", "retry_saga", "signal_saga", "approve_saga"))
    page = viewer.get(detail_url(saga))
    assert "saga_skip_url" not in page.context
    assert "Mark as done" not in page.content.decode()
    assert viewer.get(skip_url(saga, 1)).status_code == 403
    posted = viewer.post(skip_url(saga, 1), {"output": CONFIRMED, "post": "yes"})
    assert posted.status_code == 403

    strict = logged_in(staff_with("view_saga", "skip_saga"), Client(enforce_csrf_checks=True))
    assert strict.get(skip_url(saga, 1)).status_code == 200
    forged = strict.post(skip_url(saga, 1), {"output": CONFIRMED, "post": "yes"})
    assert forged.status_code == 403
    assert status(saga) == "waiting" and not skips(saga)
