"""Bulk actions: retry or compensate every saga that matches a filter, after a preview, in the
background in batches; in the API and the admin, with the single actions' permissions."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.db import connection, transaction
from django.http import QueryDict
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from sagas import services
from sagas.admin.bulk import changelist_filter_data
from sagas.bulk import BulkFilter, batches, sagas_have_business_key
from sagas.models import BulkAction, EventKind, Saga, SagaEvent
from tests.conftest import lose_messages, wait_final, wait_for
from tests.factories import UserFactory, make_operator, saga_rows

PREVIEW, BULK = "/api/sagas/bulk/preview/", "/api/sagas/bulk/"
CHANGELIST = reverse("admin:sagas_saga_changelist")
BULK_PAGE = reverse("admin:sagas_saga_bulk")
TOO_MANY = (
    "More than 2 sagas match this filter; a bulk action takes at most 2 (SAGAS_BULK_MAX_SAGAS). "
    "Narrow the filter, for instance by time range."
)


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.force_authenticate(user)
    return client


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def run_to_the_end(bulk_action: BulkAction) -> BulkAction:
    """The bulk action's batches, run here as a worker would, one after the other."""
    while batches.run_batch(bulk_action.pk):
        pass
    bulk_action.refresh_from_db()
    return bulk_action


def staff_with(*codenames: str):
    user = UserFactory(is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
    return user


@contextmanager
def locked_elsewhere(saga: Saga) -> Iterator[None]:
    """The saga's row locked by another connection, as by a step that is running."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                Saga.objects.select_for_update(no_key=True).get(pk=saga.pk)  # as the engine
                locked.set()
                release.wait(10)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join()


# -- the preview, then what happens -----------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_bulk_retry_does_what_its_preview_showed(saga_db, settings):
    settings.SAGAS_BULK_BATCH_SIZE = 2  # five sagas: three batches
    at_second = [saga_rows(stopped_at=1) for _ in range(3)]
    at_first = saga_rows(stopped_at=0, error_code="other")
    completed = saga_rows(status="completed")
    saga_rows("six_steps", stopped_at=2)  # another definition: not matched
    operator = make_operator()
    client = client_for(operator)
    body: dict[str, Any] = {"action": "retry", "filter": {"name": "three_steps"}}

    preview = client.post(PREVIEW, body, format="json")
    assert preview.status_code == 200, preview.content
    shown = preview.json()
    assert (shown["count"], shown["allowed"], shown["limit"]) == (5, 4, 10_000)
    groups = [(g["count"], g["allowed"], g["reason"], g["run"]) for g in shown["groups"]]
    assert groups == [
        (3, True, "Resume from the failed step.", ["second", "third"]),
        (1, True, "Resume from the failed step.", ["first", "second", "third"]),
        (1, False, "Only a failed saga can be retried (it is completed).", []),
    ]
    assert set(shown["groups"][0]["sample"]) == {str(saga.pk) for saga in at_second}
    assert not BulkAction.objects.exists()  # a preview changes nothing

    started = client.post(BULK, {**body, "expected_count": 5}, format="json")
    assert started.status_code == 202, started.content
    progress_url = started.json()["url"]

    def finished() -> dict | None:
        progress = client.get(progress_url).json()
        return progress if progress["status"] == "completed" else None

    result = wait_for(finished, timeout=30, what="the bulk action to finish")
    assert (result["total"], result["done"], result["skipped"], result["failed"]) == (5, 4, 1, 0)
    assert result["actor"] == operator.username
    assert result["filter"] == {"name": "three_steps"}
    assert result["skipped_sagas"] == [
        {"saga": str(completed.pk), "reason": groups[2][2]}  # as the preview said
    ]
    assert result["failed_sagas"] == []
    for saga in [*at_second, at_first]:
        assert wait_final(saga.pk).status == "completed"
        retried = SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_RETRY)
        assert retried.detail["actor"] == operator.username
        assert retried.detail["bulk_action"] == result["id"]
    listed = client.get(BULK).json()["results"]
    assert [item["id"] for item in listed] == [result["id"]]
    assert "skipped_sagas" not in listed[0]


@pytest.mark.django_db(transaction=True)
def test_sagas_that_changed_since_the_preview_are_skipped_and_reported(monkeypatch):
    lose_messages(monkeypatch)  # no worker: the batches run here, and the sagas stay put
    sent: list[int] = []
    monkeypatch.setattr("sagas.engine.dispatch.send_bulk_batch", sent.append)
    monkeypatch.setattr("sagas.engine.operator.LOCK_WAIT", 0.3)
    compensated, busy, gone, failed_otherwise, *unchanged = [saga_rows() for _ in range(6)]
    bulk_filter = BulkFilter(name="three_steps", error_code="boom")

    preview = services.bulk_action_preview(action="retry", bulk_filter=bulk_filter)
    assert (preview.count, preview.allowed) == (6, 6)
    bulk_action = services.bulk_action_start(
        action="retry", bulk_filter=bulk_filter, actor="alice", expected_count=6
    )
    assert sent == [bulk_action.pk]  # its first batch, after the commit
    # That message lost: the sweeper sends the batch again.
    assert batches.resume_stalled(stale_after=timedelta(0)) == [bulk_action.pk]
    assert sent == [bulk_action.pk, bulk_action.pk]

    # Meanwhile another operator aborts one saga, one is deleted, one was retried and failed
    # with another error, and a step of one is running (its row locked).
    services.saga_compensate(saga_id=compensated.pk, actor="bob")
    gone_id = gone.pk
    gone.delete()
    Saga.objects.filter(pk=failed_otherwise.pk).update(error_code="card_declined")
    with locked_elsewhere(busy):
        bulk_action = run_to_the_end(bulk_action)

    assert bulk_action.status == "completed" and bulk_action.finished_at is not None
    counts = (bulk_action.total, bulk_action.done, bulk_action.skipped, bulk_action.failed)
    assert counts == (6, 2, 4, 0)
    skipped = dict(bulk_action.items.filter(outcome="skipped").values_list("saga_id", "reason"))
    assert skipped == {
        compensated.pk: "Only a failed saga can be retried (it is compensating).",
        busy.pk: "The saga is busy (a step is running); try again shortly.",
        gone_id: "The saga no longer exists.",
        failed_otherwise.pk: "The saga no longer matches the filter.",
    }
    for saga in unchanged:
        assert Saga.objects.get(pk=saga.pk).status == "running"
        retried = SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_RETRY)
        assert (retried.detail["actor"], retried.detail["bulk_action"]) == ("alice", bulk_action.pk)
    for saga in (compensated, busy, failed_otherwise):
        assert not SagaEvent.objects.filter(saga=saga, kind=EventKind.OPERATOR_RETRY).exists()

    # A batch delivered again acts on nothing twice.
    assert batches.run_batch(bulk_action.pk) is False
    assert SagaEvent.objects.filter(kind=EventKind.OPERATOR_RETRY).count() == 2


# -- limits, validation and permissions -----------------------------------------------------------


def test_a_bulk_action_takes_at_most_the_limit(db, settings, admin_client):
    settings.SAGAS_BULK_MAX_SAGAS = 2
    for _ in range(3):
        saga_rows()
    staff = client_for(make_operator())
    body = {"action": "retry", "filter": {"status": "failed"}}
    for path in (PREVIEW, BULK):
        response = staff.post(path, body, format="json")
        assert response.status_code == 400
        assert response.json() == {"filter": [TOO_MANY]}

    page = admin_client.get(BULK_PAGE, {"status__exact": "failed"})
    assert page.context["refused"] == TOO_MANY
    assert "saga-confirm" not in page.content.decode()  # nothing to confirm
    posted = {"status": "failed", "action": "retry", "expected_count": "3"}
    refused = admin_client.post(BULK_PAGE, posted)
    assert refused.status_code == 302 and TOO_MANY in messages_of(refused)
    assert not BulkAction.objects.exists()

    settings.SAGAS_BULK_MAX_SAGAS = 3
    assert staff.post(PREVIEW, body, format="json").json()["count"] == 3


BAD_BODIES = [
    ({"action": "resolve", "filter": {}}, {"action"}),
    ({"action": "retry"}, {"filter"}),
    ({"action": "retry", "filter": {}, "colour": "red"}, {"colour"}),
    ({"action": "retry", "filter": {"status": "bogus"}}, {"filter.status"}),
    ({"action": "retry", "filter": {"shape": "round"}}, {"filter.shape"}),
    ({"action": "retry", "filter": {"name": 12}}, {"filter.name"}),
    ({"action": "retry", "filter": {"created_from": "yesterday"}}, {"filter.created_from"}),
    ({"action": "retry", "filter": {"updated_before": 12}}, {"filter.updated_before"}),
    (
        {
            "action": "retry",
            "filter": {"created_from": "2026-11-26T10:00Z", "created_before": "2026-11-26T09:00Z"},
        },
        {"filter.created_before"},
    ),
]


def error_fields(errors: dict) -> set[str]:
    nested = errors.get("filter") if isinstance(errors.get("filter"), dict) else {}
    return {key for key in errors if key != "filter" or not nested} | {
        f"filter.{key}" for key in nested
    }


def test_a_bad_body_is_a_400_with_field_errors_and_starts_nothing(db):
    saga_rows()
    staff = client_for(make_operator())
    for body, fields in BAD_BODIES:
        for path in (PREVIEW, BULK):
            response = staff.post(path, body, format="json")
            assert response.status_code == 400, (path, body, response.content)
            assert error_fields(response.json()) == fields, (path, body, response.json())
    counted = staff.post(BULK, {"action": "retry", "filter": {}, "expected_count": "1"}, "json")
    assert counted.status_code == 400 and "expected_count" in counted.json()
    nothing = staff.post(BULK, {"action": "retry", "filter": {"name": "none"}}, format="json")
    assert nothing.json() == {"filter": ["No saga matches this filter."]}
    # The business key: a filter of its own where sagas have the column, refused before.
    keyed = {"action": "retry", "filter": {"business_key": "order-42"}}
    response = staff.post(PREVIEW, keyed, format="json")
    if sagas_have_business_key():
        assert response.status_code == 200 and response.json()["count"] == 0
    else:
        assert response.json() == {
            "filter": {"business_key": ["This project's sagas have no business key."]}
        }
    assert not BulkAction.objects.exists()


def test_bulk_actions_need_the_single_actions_permissions(db, client):
    saga_rows()
    retry = {"action": "retry", "filter": {}}
    compensate = {"action": "compensate", "filter": {}}
    customer, viewer = UserFactory(), staff_with("view_saga")
    retrier = staff_with("view_saga", "retry_saga")

    assert client_for().post(PREVIEW, retry, format="json").status_code == 401
    assert client_for().get(BULK).status_code == 401
    for path in (PREVIEW, BULK):
        assert client_for(customer).post(path, retry, format="json").status_code == 403
    assert client_for(customer).get(BULK).status_code == 403
    # Staff see the preview (as a single action's plan) and the bulk actions.
    assert client_for(viewer).post(PREVIEW, retry, format="json").status_code == 200
    assert client_for(viewer).get(BULK).status_code == 200
    for body in (retry, compensate):
        assert client_for(viewer).post(BULK, body, format="json").status_code == 403
    assert client_for(retrier).post(BULK, compensate, format="json").status_code == 403
    assert not BulkAction.objects.exists()
    assert client_for(retrier).post(BULK, retry, format="json").status_code == 202

    # The admin: no link, no page without an action's permission.
    client.force_login(viewer)
    assert "saga_bulk_url" not in client.get(CHANGELIST).context
    assert client.get(BULK_PAGE).status_code == 403
    assert client.post(BULK_PAGE, {"action": "retry"}).status_code == 403
    # With retry's only: retry alone is previewed and may be started.
    client.force_login(retrier)
    assert client.get(CHANGELIST, {"status__exact": "failed"}).context["saga_bulk_url"] == (
        f"{BULK_PAGE}?status__exact=failed"
    )
    page = client.get(BULK_PAGE, {"status__exact": "failed"})
    assert [section.action for section in page.context["previews"]] == ["retry"]
    posted = {"status": "failed", "action": "compensate", "expected_count": "1"}
    assert client.post(BULK_PAGE, posted).status_code == 403
    assert BulkAction.objects.get().action == "retry"  # the API's, above


# -- the filter and the admin ---------------------------------------------------------------------


def test_each_field_of_the_filter(db):
    first = saga_rows(stopped_at=0, error_code="declined")
    second = saga_rows(stopped_at=1)
    completed = saga_rows(status="completed")
    other = saga_rows("six_steps", stopped_at=1)
    a_day_ago = timezone.now() - timedelta(days=1)
    Saga.objects.filter(pk=first.pk).update(created_at=a_day_ago, updated_at=a_day_ago)

    def matched(**fields: Any) -> set:
        return set(BulkFilter(**fields).sagas().values_list("pk", flat=True))

    everything = {first.pk, second.pk, completed.pk, other.pk}
    assert matched() == everything
    assert matched(status="failed") == everything - {completed.pk}
    assert matched(name="six_steps") == {other.pk}
    assert matched(error_code="declined") == {first.pk}
    assert matched(failed_step="second") == {second.pk}
    assert matched(failed_step="step_1") == {other.pk}
    an_hour_ago = timezone.now() - timedelta(hours=1)
    assert matched(created_before=an_hour_ago) == {first.pk}
    assert matched(created_from=an_hour_ago) == everything - {first.pk}
    assert matched(updated_from=a_day_ago, updated_before=an_hour_ago) == {first.pk}
    recorded = BulkFilter(status="failed", created_from=an_hour_ago)
    assert BulkFilter.from_json(recorded.as_json()) == recorded


def test_the_admin_previews_the_lists_filters_then_shows_the_progress(db, admin_client):
    failed = [saga_rows() for _ in range(2)]
    completed = saga_rows(status="completed")
    listed = admin_client.get(CHANGELIST, {"name": "three_steps"})
    assert listed.context["saga_bulk_url"] == f"{BULK_PAGE}?name=three_steps"
    assert "Retry or compensate all matching" in listed.content.decode()

    page = admin_client.get(BULK_PAGE, {"name": "three_steps", "q": "abc", "o": "2"})
    assert page.context["left_out"] == ["q=abc"]  # the search is not a bulk filter
    previews = {section.action: section.preview for section in page.context["previews"]}
    assert (previews["retry"].count, previews["retry"].allowed) == (3, 2)
    assert (previews["compensate"].count, previews["compensate"].allowed) == (3, 2)
    html = page.content.decode()
    assert 'value="Retry 2 sagas"' in html and 'value="Compensate 2 sagas"' in html
    assert 'name="expected_count" value="3"' in html

    posted = {"name": "three_steps", "action": "retry", "expected_count": "2"}  # stale
    outdated = admin_client.post(BULK_PAGE, posted)
    assert outdated["Location"].startswith(f"{BULK_PAGE}?")
    assert "_preview=1" in outdated["Location"] and "name=three_steps" in outdated["Location"]
    again = admin_client.get(outdated["Location"])  # the preview anew, with the message
    assert messages_of(again) == [
        "The filter now matches 3 sagas, not the 2 of its preview: preview it again."
    ]
    assert again.context["form"].cleaned_data["name"] == "three_steps"
    started = admin_client.post(BULK_PAGE, {**posted, "expected_count": "3"})
    bulk_action = BulkAction.objects.get()
    progress_url = reverse("admin:sagas_bulkaction_change", args=[bulk_action.pk])
    assert started["Location"] == progress_url
    assert messages_of(started) == [f"Bulk retry {bulk_action.pk} started on 3 sagas."]
    waiting = admin_client.get(progress_url).content.decode()
    assert 'http-equiv="refresh"' in waiting and "0 of 3: 0 done" in waiting

    run_to_the_end(bulk_action)  # as the workers would
    done = admin_client.get(progress_url).content.decode()
    assert 'http-equiv="refresh"' not in done
    assert "3 of 3: 2 done, 1 skipped, 0 failed" in done
    assert str(completed.pk) in done and "Only a failed saga can be retried" in done
    timeline = admin_client.get(reverse("admin:sagas_saga_change", args=[failed[0].pk]))
    assert f"by admin · in bulk action {bulk_action.pk}" in timeline.content.decode()
    assert admin_client.get(reverse("admin:sagas_bulkaction_changelist")).status_code == 200


def test_the_lists_date_hierarchy_becomes_a_time_range(settings):
    settings.TIME_ZONE = "UTC"
    data, left_out = changelist_filter_data(
        QueryDict("created_at__year=2026&created_at__month=12&status__exact=failed&p=2")
    )
    assert data == {
        "status": "failed",
        "created_from": "2026-12-01 00:00:00+00:00",
        "created_before": "2027-01-01 00:00:00+00:00",
    }
    assert left_out == []


# -- operator actions sent again --------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_an_operator_action_sent_again_with_its_key_gets_the_first_answer(monkeypatch):
    """Issue 17, case 6: an operator's POST whose answer was lost (its COMMIT done) is sent
    again with its Idempotency-Key: the first answer, and nothing done twice."""
    lose_messages(monkeypatch)
    saga = saga_rows(stopped_at=1)
    client = client_for(make_operator())
    url = f"/api/sagas/{saga.pk}/retry/"

    first = client.post(url, HTTP_IDEMPOTENCY_KEY="retry-1")
    assert first.status_code == 202, first.content
    assert not first.has_header("Idempotent-Replayed")
    again = client.post(url, HTTP_IDEMPOTENCY_KEY="retry-1")
    assert again.status_code == 202
    assert again["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert SagaEvent.objects.filter(saga=saga, kind=EventKind.OPERATOR_RETRY).count() == 1
    assert client.post(url).status_code == 409  # without it: a second retry, refused

    other = client.post(f"/api/sagas/{saga.pk}/compensate/", HTTP_IDEMPOTENCY_KEY="retry-1")
    assert other.status_code == 422
    assert "used for another request" in other.json()["detail"]
    bad = client.post(url, HTTP_IDEMPOTENCY_KEY="a key with spaces")
    assert bad.status_code == 400 and "Idempotency-Key" in bad.json()
    # A refused request keeps no key: sent again once it may act, it acts.
    failed = saga_rows(stopped_at=1)
    done = saga_rows(status="completed")
    assert client.post(f"/api/sagas/{done.pk}/retry/", HTTP_IDEMPOTENCY_KEY="k2").status_code == 409
    retried = client.post(f"/api/sagas/{failed.pk}/retry/", HTTP_IDEMPOTENCY_KEY="k3")
    assert retried.status_code == 202
    # Keys are the user's own: another operator's same key is another request.
    mine = client_for(make_operator()).post(
        f"/api/sagas/{saga.pk}/compensate/", HTTP_IDEMPOTENCY_KEY="retry-1"
    )
    assert mine.status_code == 202


@pytest.mark.django_db(transaction=True)
def test_an_admin_confirmation_sent_twice_acts_once_on_each_saga(monkeypatch, admin_client):
    """The confirmation's one-time token is written with each saga's action: sent again (its
    answer lost), it acts on none it acted on, and on one that refused it the first time."""
    lose_messages(monkeypatch)
    monkeypatch.setattr("sagas.engine.operator.LOCK_WAIT", 0.3)
    first_saga, busy = saga_rows(stopped_at=1), saga_rows(stopped_at=1)
    changelist = reverse("admin:sagas_saga_changelist")
    selected = {"action": "retry_sagas", "_selected_action": [str(first_saga.pk), str(busy.pk)]}
    page = admin_client.post(changelist, {**selected, "index": "0"})
    once = page.context["once"]
    assert f'name="_once" value="{once}"' in page.content.decode()
    confirmed = {**selected, "post": "yes", "_once": once}
    with locked_elsewhere(busy):  # a step holds it: refused, and its key not written
        first = admin_client.post(changelist, confirmed, follow=True).content.decode()
    assert "Retried 1 saga." in first and f"Saga {busy.pk} was not changed" in first
    again = admin_client.post(changelist, confirmed, follow=True).content.decode()
    assert "Retried 1 saga." in again
    assert "This confirmation was sent before: 1 of its sagas were acted on then" in again
    for saga in (first_saga, busy):
        assert SagaEvent.objects.filter(saga=saga, kind=EventKind.OPERATOR_RETRY).count() == 1
