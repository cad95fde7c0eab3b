"""An approver's signed link: a page that changes nothing when opened, whose form (a POST
with its CSRF token) approves or rejects; signing in with `sagas.approve_saga` by default, or
the link alone as the credential. Real workers run the steps (`saga_db`)."""

from __future__ import annotations

import re

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client, override_settings

from sagas import services
from sagas.models import EventKind, Saga, SagaEvent, SagaSignal
from sagas.signing import approval_token, signal_token
from tests.conftest import wait_final, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def waiting_saga(order: str = "o-1") -> Saga:
    saga, _ = services.saga_start(name="needs_approval", input={"order": order})
    wait_for(
        lambda: Saga.objects.values_list("status", flat=True).get(pk=saga.pk) == "waiting",
        timeout=20,
        what="the saga to wait",
    )
    return saga


def link(saga: Saga, stage: str = "review", approver: str = "") -> str:
    return f"/api/sagas/approvals/{approval_token(saga.pk, stage, approver)}/"


def approver(*, permitted: bool = True) -> User:
    user = User.objects.create_user("carol", password="x")
    if permitted:
        user.user_permissions.add(Permission.objects.get(codename="approve_saga"))
    return user


def csrf_of(page) -> str:
    found = re.search(rb'name="csrfmiddlewaretoken" value="([^"]+)"', page.content)
    assert found, page.content
    return found.group(1).decode()


def decided(saga: Saga) -> list[dict]:
    kinds = [EventKind.WAIT_COMPLETED, EventKind.WAIT_FAILED]
    return list(
        SagaEvent.objects.filter(saga=saga, kind__in=kinds).values_list("detail", flat=True)
    )


def test_opening_the_link_changes_nothing_and_only_the_pages_form_decides(saga_db):
    saga = waiting_saga()
    client = Client(enforce_csrf_checks=True)
    url = link(saga)
    answer = client.get(url)
    assert answer.status_code == 302 and "login" in answer["Location"]  # sign in first
    client.force_login(approver(permitted=False))
    assert client.get(url).status_code == 403
    user = User.objects.get(username="carol")
    user.user_permissions.add(Permission.objects.get(codename="approve_saga"))
    client.force_login(User.objects.get(pk=user.pk))

    page = client.get(url)
    assert page.status_code == 200 and b"Approve" in page.content and b"ship" in page.content
    assert page["Referrer-Policy"] == "no-referrer" and "no-store" in page["Cache-Control"]
    assert b"reserve" in page.content  # what rejecting undoes
    assert Saga.objects.get(pk=saga.pk).status == "waiting" and not SagaSignal.objects.exists()

    assert client.post(url, {"decision": "approve"}).status_code == 403  # no CSRF token
    for bad in ({"decision": "maybe"}, {"decision": "approve", "note": "x" * 1001}, {}):
        answer = client.post(url, {**bad, "csrfmiddlewaretoken": csrf_of(page)})
        assert answer.status_code == 400, bad
    assert not SagaSignal.objects.exists()

    token = csrf_of(page)
    answer = client.post(url, {"decision": "approve", "note": "ok", "csrfmiddlewaretoken": token})
    assert answer.status_code == 200 and b"Approved" in answer.content
    assert wait_final(saga.pk, timeout=20).status == "completed"
    [detail] = decided(saga)
    assert (detail["decision"], detail["by"], detail["note"]) == ("approved", "carol", "ok")
    again = client.post(url, {"decision": "approve", "csrfmiddlewaretoken": token})
    assert again.status_code == 200 and b"taken already" in again.content
    other = client.post(url, {"decision": "reject", "csrfmiddlewaretoken": token})
    assert other.status_code == 409
    assert Saga.objects.get(pk=saga.pk).status == "completed"


@override_settings(SAGAS_APPROVAL_LINK_SIGN_IN=False)
def test_where_the_link_is_the_credential_the_timeline_names_its_approver(saga_db):
    saga = waiting_saga()
    client = Client(enforce_csrf_checks=True)
    url = link(saga, approver="dora@example.com")
    page = client.get(url)
    assert page.status_code == 200
    answer = client.post(
        url, {"decision": "reject", "note": "no", "csrfmiddlewaretoken": csrf_of(page)}
    )
    assert answer.status_code == 200 and b"Rejected" in answer.content
    assert wait_final(saga.pk, timeout=20).status == "compensated"
    [detail] = decided(saga)
    assert (detail["by"], detail["note"]) == ("dora@example.com (by link)", "no")


@override_settings(SAGAS_APPROVAL_LINK_SIGN_IN=False)
def test_forged_tampered_expired_and_foreign_links_are_refused_and_change_nothing(saga_db):
    saga = waiting_saga()
    client = Client()
    good = approval_token(saga.pk, "review")
    for token, code in [
        ("not-a-token", 404),
        (good[:-2] + ("AA" if not good.endswith("AA") else "BB"), 404),
        (signal_token(saga.pk, "review"), 404),  # a signal URL's token is not an approval's
        (approval_token(saga.pk, "reserve"), 404),  # a step, not an approval
        (approval_token("00000000-0000-0000-0000-000000000000", "review"), 404),
        ("x" * 5000, 404),
    ]:
        url = f"/api/sagas/approvals/{token}/"
        assert client.get(url).status_code == code, token
        assert client.post(url, {"decision": "approve"}).status_code == code, token
    with override_settings(SAGAS_APPROVAL_LINK_MAX_AGE=-1):
        assert client.get(link(saga)).status_code == 410
        assert client.post(link(saga), {"decision": "approve"}).status_code == 410
    assert Saga.objects.get(pk=saga.pk).status == "waiting" and not SagaSignal.objects.exists()


def test_the_decision_forms_refuse_a_note_postgresql_cannot_store():
    """A lone surrogate reaches a form where the request spells its text in another charset
    (UTF-7 in a multipart part): the form refuses it, rather than the database."""
    from sagas.admin.actions import DecisionForm as AdminDecisionForm
    from sagas.views import DecisionForm

    for note in ("lone \ud800 surrogate", "nul \x00 here"):
        assert not DecisionForm({"decision": "approve", "note": note}).is_valid()
        assert not AdminDecisionForm({"note": note}).is_valid()
    assert DecisionForm({"decision": "approve", "note": "fine"}).is_valid()
