"""Bulk skip: the stage of one name marked as done, with one output, in every saga a filter
matches (after a provider's outage, its payments confirmed out of band); in the API and the
admin, with `sagas.skip_saga`. Real workers run the steps (`saga_db`)."""

from __future__ import annotations

from typing import Any

import pytest
from django.db import IntegrityError, transaction
from django.urls import reverse

from sagas import services
from sagas.bulk import BulkFilter, BulkSkip
from sagas.exceptions import BulkActionRefused
from sagas.models import BulkAction, EventKind, Saga, SagaEvent, SagaStep
from tests.conftest import wait_final, wait_for
from tests.factories import make_operator
from tests.test_admin_waits import messages_of, start, waiting
from tests.test_bulk import BULK, BULK_PAGE, PREVIEW, client_for, run_to_the_end, staff_with

pytestmark = pytest.mark.django_db(transaction=True)

CONFIRMED = {"reference": "outage-2026-12-07"}
NOTE = "Gateway outage: confirmed on the provider's statement."
MARKED = "Mark confirmation as done with the output given; the saga goes on from there."
NO_SUCH_STAGE = "The saga has no stage confirmation."


@pytest.fixture(autouse=True)
def fast_password_hashing(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


def skips(saga: Saga) -> list[dict]:
    kind = EventKind.OPERATOR_SKIP
    return list(SagaEvent.objects.filter(saga=saga, kind=kind).values_list("detail", flat=True))


def three_waiting() -> tuple[Saga, Saga, Saga]:
    """Two sagas waiting at their confirmation, and one at an approval (no confirmation)."""
    first, second = start(order="o-1"), start(order="o-2")
    approval = start("needs_approval", order="o-3")
    waiting(first, second, approval)
    return first, second, approval


def test_a_bulk_skip_marks_the_stage_as_done_where_it_can_and_reports_the_rest(saga_db):
    first, second, approval = three_waiting()
    operator = make_operator()
    client = client_for(operator)
    body: dict[str, Any] = {
        "action": "skip",
        "filter": {"status": "waiting"},
        "stage": "confirmation",
        "output": CONFIRMED,
        "note": NOTE,
    }
    shown = client.post(PREVIEW, body, format="json")
    assert shown.status_code == 200, shown.content
    preview = shown.json()
    assert (preview["count"], preview["allowed"]) == (3, 2)
    groups = [
        (g["name"], g["count"], g["allowed"], g["reason"], g["run"]) for g in preview["groups"]
    ]
    assert groups == [
        ("waits_for_payment", 2, True, MARKED, ["ship"]),
        ("needs_approval", 1, False, NO_SUCH_STAGE, []),
    ]
    refused = client.post(PREVIEW, {**body, "output": {"other": 1}}, format="json").json()
    assert [(g["count"], g["allowed"], g["reason"]) for g in refused["groups"]] == [
        (2, False, "The stage refuses the output: A confirmation has a reference."),
        (1, False, NO_SUCH_STAGE),
    ]
    approved = client.post(PREVIEW, {**body, "stage": "review"}, format="json").json()
    assert {g["reason"] for g in approved["groups"]} == {
        "An approval is decided, not skipped: approve or reject it.",
        "The saga has no stage review.",
    }
    assert not BulkAction.objects.exists() and not skips(first)  # previews change nothing

    started = client.post(BULK, {**body, "expected_count": 3}, format="json")
    assert started.status_code == 202, started.content
    assert {key: started.json()[key] for key in ("action", "stage", "output", "note")} == {
        "action": "skip",
        "stage": "confirmation",
        "output": CONFIRMED,
        "note": NOTE,
    }

    def finished() -> dict | None:
        progress = client.get(started.json()["url"]).json()
        return progress if progress["status"] == "completed" else None

    result = wait_for(finished, timeout=30, what="the bulk skip to finish")
    assert (result["total"], result["done"], result["skipped"], result["failed"]) == (3, 2, 1, 0)
    assert result["skipped_sagas"] == [{"saga": str(approval.pk), "reason": NO_SUCH_STAGE}]
    for saga in (first, second):
        assert wait_final(saga.pk).status == "completed"
        ship = SagaStep.objects.get(saga=saga, name="ship")
        assert ship.output == {"confirmed": CONFIRMED}  # the next stage read the output
        [detail] = skips(saga)
        assert detail == {"actor": operator.username, "bulk_action": result["id"], "note": NOTE}
    assert Saga.objects.get(pk=approval.pk).status == "waiting" and not skips(approval)


def test_a_saga_that_changed_since_the_start_is_skipped_over_with_the_reason(saga_db, monkeypatch):
    monkeypatch.setattr("sagas.engine.dispatch.send_bulk_batch", lambda bulk_action_id: None)
    signalled, refused, unchanged = start(order="o-a"), start(order="o-b"), start(order="o-c")
    waiting(signalled, refused, unchanged)
    bulk_action = services.bulk_action_start(
        action="skip",
        bulk_filter=BulkFilter(name="waits_for_payment"),
        actor="alice",
        expected_count=3,
        skip=BulkSkip("confirmation", CONFIRMED, NOTE),
    )
    # Before its batch runs: the payment of one is confirmed (its saga goes on), and another's
    # wait now refuses the output (a deploy that changed its validator, say).
    services.saga_signal(saga_id=signalled.pk, event="payment_confirmed", payload=CONFIRMED)
    assert wait_final(signalled.pk).status == "completed"
    SagaStep.objects.filter(saga=refused, name="confirmation").update(
        stored_definition={  # a copy of its own, in its row
            **SagaStep.objects.get(saga=refused, name="confirmation").definition,
            "max_payload_bytes": 10,
        }
    )
    bulk_action = run_to_the_end(bulk_action)  # as a worker would

    counts = (bulk_action.total, bulk_action.done, bulk_action.skipped, bulk_action.failed)
    assert counts == (3, 1, 2, 0)
    reasons = dict(bulk_action.items.filter(outcome="skipped").values_list("saga_id", "reason"))
    assert reasons == {
        signalled.pk: (
            "Only a waiting stage, or the failed stage a paused saga stopped at, can be skipped."
        ),
        refused.pk: "The stage refuses the output: At most 10 bytes of JSON (this is 33).",
    }
    assert not skips(signalled) and not skips(refused)
    assert Saga.objects.get(pk=refused.pk).status == "waiting"
    assert wait_final(unchanged.pk).status == "completed"
    assert skips(unchanged)[0]["bulk_action"] == bulk_action.pk


def test_a_bulk_skip_names_its_stage_and_needs_the_permission(saga_db):
    saga = start()
    waiting(saga)
    operator = client_for(make_operator())
    base = {"filter": {"status": "waiting"}}
    for body, errors in [
        ({**base, "action": "skip"}, {"stage"}),
        ({**base, "action": "skip", "stage": ""}, {"stage"}),
        ({**base, "action": "skip", "stage": "confirmation", "output": "nul \u0000"}, {"output"}),
        ({**base, "action": "skip", "stage": "confirmation", "note": 5}, {"note"}),
        ({**base, "action": "retry", "stage": "confirmation", "output": None}, {"stage", "output"}),
    ]:
        for path in (PREVIEW, BULK):
            answer = operator.post(path, body, format="json")
            assert answer.status_code == 400, (path, body, answer.content)
            assert set(answer.json()) == errors, (path, body, answer.json())
    with pytest.raises(BulkActionRefused, match="Name the stage"):
        services.bulk_action_preview(action="skip", bulk_filter=BulkFilter())
    with pytest.raises(BulkActionRefused, match="not a retry's"):
        services.bulk_action_preview(
            action="retry", bulk_filter=BulkFilter(), skip=BulkSkip("confirmation")
        )

    retrier = client_for(staff_with("view_saga", "retry_saga", "compensate_saga"))
    body = {**base, "action": "skip", "stage": "confirmation", "output": CONFIRMED}
    assert retrier.post(BULK, body, format="json").status_code == 403
    assert not BulkAction.objects.exists()
    # The table says so too: a skip names its stage, the other actions none.
    for action, stage in (("skip", None), ("retry", "confirmation")):
        with pytest.raises(IntegrityError), transaction.atomic():
            BulkAction.objects.create(
                action=action, stage=stage, filter={}, actor="a", batch_size=1
            )
    assert Saga.objects.get(pk=saga.pk).status == "waiting"


def test_the_admin_previews_and_starts_a_bulk_skip(saga_db, admin_client, client):
    first, second, approval = three_waiting()
    page = admin_client.get(BULK_PAGE, {"status__exact": "waiting"})
    previews = [section.action for section in page.context["previews"]]
    assert previews == ["retry", "compensate", "reconcile"]
    assert "skip-stage" in page.content.decode()  # the skip's fields, to fill in

    query = {
        "status": "waiting",
        "skip-stage": "confirmation",
        "skip-output": '{"reference": "outage-2026-12-07"}',
        "skip-note": NOTE,
        "_preview": "1",
    }
    bad = admin_client.get(BULK_PAGE, {**query, "skip-output": "{not json"})
    assert "skip" not in [section.action for section in bad.context["previews"]]
    assert "Enter a valid JSON." in bad.content.decode()
    shown = admin_client.get(BULK_PAGE, query)
    [section] = [s for s in shown.context["previews"] if s.action == "skip"]
    assert (section.preview.count, section.preview.allowed) == (3, 2)
    html = shown.content.decode()
    assert 'value="Mark confirmation as done in 2 sagas"' in html
    assert NO_SUCH_STAGE in html

    posted = {
        "status": "waiting",
        "skip-stage": "confirmation",
        "skip-output": '{"reference": "outage-2026-12-07"}',
        "skip-note": NOTE,
        "action": "skip",
        "expected_count": "3",
    }
    started = admin_client.post(BULK_PAGE, posted)
    bulk_action = BulkAction.objects.get()
    progress_url = reverse("admin:sagas_bulkaction_change", args=[bulk_action.pk])
    assert started["Location"] == progress_url
    assert messages_of(started) == [f"Bulk skip {bulk_action.pk} started on 3 sagas."]
    assert (bulk_action.stage, bulk_action.output, bulk_action.note) == (
        "confirmation",
        CONFIRMED,
        NOTE,
    )
    for saga in (first, second):
        assert wait_final(saga.pk).status == "completed"
    wait_for(
        lambda: BulkAction.objects.get().status == "completed",
        timeout=30,
        what="the bulk skip to finish",
    )
    done = admin_client.get(progress_url).content.decode()
    assert "3 of 3: 2 done, 1 skipped, 0 failed" in done
    assert "Stage marked as done" in done and "outage-2026-12-07" in done
    assert str(approval.pk) in done and NO_SUCH_STAGE in done

    client.force_login(staff_with("view_saga", "retry_saga"))  # no skip_saga
    page = client.get(BULK_PAGE, query)
    assert page.context["skip_form"] is None
    assert [section.action for section in page.context["previews"]] == ["retry"]
    assert client.post(BULK_PAGE, posted).status_code == 403


def test_a_bulk_skip_marks_a_failed_member_of_a_group_as_done(saga_db, tmp_path):
    """Two sagas paused in their group with its member b failed (its service down) and one
    whose b completed: a bulk skip of `parallel.b` marks b as done in the first two, which
    complete; the third is counted apart (its b did not fail)."""
    from tests.test_groups import members, products
    from tests.test_groups import start as start_group

    stuck = tmp_path / "down"
    stuck.touch()
    paused = [
        start_group(skus=products("a", "b", "c"), behave={"b": "stuck"}, stuck=str(stuck))
        for _ in range(2)
    ]
    for saga in paused:
        wait_for(lambda saga=saga: Saga.objects.get(pk=saga.pk).status == "failed", what="pause")
    stuck.unlink()
    completed = wait_final(start_group(skus=products("a", "b", "c")).pk)
    client = client_for(make_operator())
    body: dict[str, Any] = {
        "action": "skip",
        "filter": {"name": "group_listed"},
        "stage": "parallel.b",
        "output": {"sku": "by-phone"},
        "note": "Reserved by phone.",
    }
    preview = client.post(PREVIEW, body, format="json").json()
    assert [(g["count"], g["allowed"]) for g in preview["groups"]] == [(2, True), (1, False)]
    ghost = client.post(PREVIEW, {**body, "stage": "parallel.z"}, format="json").json()
    assert {g["reason"] for g in ghost["groups"]} == {"The saga's group parallel has no member z."}

    started = client.post(BULK, {**body, "expected_count": 3}, format="json")
    assert started.status_code == 202, started.content

    def finished() -> dict | None:
        progress = client.get(started.json()["url"]).json()
        return progress if progress["status"] == "completed" else None

    result = wait_for(finished, timeout=30, what="the bulk skip to finish")
    assert (result["total"], result["done"], result["skipped"]) == (3, 2, 1)
    for saga in paused:
        assert wait_final(saga.pk).status == "completed"
        assert members(saga)["b"].output == {"sku": "by-phone"}
        [detail] = skips(saga)
        assert detail["note"] == "Reserved by phone." and detail["member"] == "b"
    assert not skips(completed)
