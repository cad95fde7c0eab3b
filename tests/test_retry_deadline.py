"""An operator's retry chooses what becomes of the saga's deadline: kept (cleared if it passed
while the saga waited), cleared, or set anew; through the services, the API and the admin."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from sagas.engine import KEEP
from sagas.exceptions import InvalidTransition
from sagas.models import EventKind, Saga, SagaEvent
from sagas.services import saga_plan, saga_retry
from tests.conftest import lose_messages
from tests.factories import make_operator, saga_rows

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def _no_messages(monkeypatch):
    lose_messages(monkeypatch)


def with_deadline(when, **kwargs) -> Saga:
    saga = saga_rows(**kwargs)
    Saga.objects.filter(pk=saga.pk).update(deadline_at=when)
    return Saga.objects.get(pk=saga.pk)


def retried_detail(saga: Saga) -> dict:
    return SagaEvent.objects.get(saga=saga, kind=EventKind.OPERATOR_RETRY).detail


def test_each_choice_and_what_the_plan_says_of_it():
    soon = timezone.now() + timedelta(hours=1)
    later = timezone.now() + timedelta(days=2)

    kept = with_deadline(soon)
    plan = saga_plan(saga_id=kept.pk, action="retry")
    assert f"Its deadline, {soon.isoformat(timespec='seconds')}, still holds" in plan.reason
    saga_retry(saga_id=kept.pk, actor="op")
    assert Saga.objects.get(pk=kept.pk).deadline_at == soon

    passed = with_deadline(timezone.now() - timedelta(minutes=1))
    assert "passed while it waited: the retry clears it" in (
        saga_plan(saga_id=passed.pk, action="retry").reason
    )
    saga_retry(saga_id=passed.pk, actor="op", deadline=KEEP)
    assert Saga.objects.get(pk=passed.pk).deadline_at is None
    assert "deadline_cleared" in retried_detail(passed)

    cleared = with_deadline(soon)
    assert "Its deadline is cleared." in (
        saga_plan(saga_id=cleared.pk, action="retry", deadline=None).reason
    )
    saga_retry(saga_id=cleared.pk, actor="op", deadline=None)
    assert Saga.objects.get(pk=cleared.pk).deadline_at is None
    assert retried_detail(cleared)["deadline"] is None
    assert retried_detail(cleared)["deadline_before"] == soon.isoformat()

    extended = with_deadline(timezone.now() - timedelta(minutes=1))
    saga_retry(saga_id=extended.pk, actor="op", deadline=later)
    assert Saga.objects.get(pk=extended.pk).deadline_at == later
    assert retried_detail(extended)["deadline"] == later.isoformat()

    none_yet = saga_rows()
    saga_retry(saga_id=none_yet.pk, actor="op", deadline=later)  # a saga without one gets one
    assert Saga.objects.get(pk=none_yet.pk).deadline_at == later


def test_a_deadline_in_the_past_or_for_a_compensation_is_refused_and_changes_nothing():
    saga = with_deadline(None)
    with pytest.raises(InvalidTransition, match="already passed"):
        saga_retry(saga_id=saga.pk, actor="op", deadline=timezone.now() - timedelta(seconds=1))
    assert Saga.objects.get(pk=saga.pk).status == "failed"

    backward = saga_rows()
    Saga.objects.filter(pk=backward.pk).update(direction="backward")
    with pytest.raises(InvalidTransition, match="no deadline to change"):
        saga_retry(saga_id=backward.pk, actor="op", deadline=None)
    assert not SagaEvent.objects.filter(kind=EventKind.OPERATOR_RETRY).exists()


def test_the_api_takes_a_deadline_or_null_and_refuses_a_bad_one_with_field_errors():
    client = APIClient()
    client.force_authenticate(make_operator())
    later = timezone.now() + timedelta(days=1)

    saga = with_deadline(timezone.now() + timedelta(minutes=5))
    plan = client.get(
        f"/api/sagas/{saga.pk}/plan/", {"action": "retry", "deadline": later.isoformat()}
    )
    assert plan.status_code == 200 and "Its deadline is set to" in plan.json()["reason"]
    cleared = client.get(f"/api/sagas/{saga.pk}/plan/", {"action": "retry", "deadline": ""})
    assert "Its deadline is cleared." in cleared.json()["reason"]
    wrong = client.get(f"/api/sagas/{saga.pk}/plan/", {"action": "compensate", "deadline": ""})
    assert wrong.status_code == 400 and "deadline" in wrong.json()

    url = f"/api/sagas/{saga.pk}/retry/"
    for body, field in [
        ({"deadline": "tomorrow"}, "deadline"),
        ({"deadline": (timezone.now() - timedelta(hours=1)).isoformat()}, "deadline"),
        ({"deadline": later.isoformat(), "extend": True}, "extend"),
    ]:
        refused = client.post(url, body, format="json")
        assert refused.status_code == 400, refused.content
        assert field in refused.json()
    assert Saga.objects.get(pk=saga.pk).status == "failed"

    done = client.post(
        url, {"deadline": later.isoformat()}, format="json", HTTP_IDEMPOTENCY_KEY="d-1"
    )
    assert done.status_code == 202, done.content
    assert Saga.objects.get(pk=saga.pk).deadline_at == later
    # The same key with another choice is another request.
    other = client.post(url, {"deadline": None}, format="json", HTTP_IDEMPOTENCY_KEY="d-1")
    assert other.status_code == 422
    again = client.post(
        url, {"deadline": later.isoformat()}, format="json", HTTP_IDEMPOTENCY_KEY="d-1"
    )
    assert again.status_code == 202 and again["Idempotent-Replayed"] == "true"

    null = saga_rows()
    assert (
        client.post(f"/api/sagas/{null.pk}/retry/", {"deadline": None}, format="json").status_code
        == 202
    )
    no_body = saga_rows()
    assert client.post(f"/api/sagas/{no_body.pk}/retry/").status_code == 202


def test_the_admin_confirmation_offers_the_deadline_and_sets_it(admin_client):
    saga = with_deadline(timezone.now() - timedelta(minutes=1))
    changelist = reverse("admin:sagas_saga_changelist")
    selected = {"action": "retry_sagas", "_selected_action": [str(saga.pk)]}
    page = admin_client.post(changelist, {**selected, "index": "0"})
    assert "Deadline of the sagas that resume forward" in page.content.decode()
    confirm = {**selected, "post": "yes", "_once": page.context["once"]}

    bad = admin_client.post(changelist, {**confirm, "deadline": "extend", "extend_by": "2 hours"})
    assert bad.status_code == 200  # the confirmation again, with the error
    assert "is not a duration" in bad.content.decode()
    assert Saga.objects.get(pk=saga.pk).status == "failed"

    before = timezone.now()
    done = admin_client.post(
        changelist, {**confirm, "deadline": "extend", "extend_by": "2h"}, follow=True
    )
    assert "Retried 1 saga." in done.content.decode()
    deadline = Saga.objects.get(pk=saga.pk).deadline_at
    assert before + timedelta(hours=2) <= deadline <= timezone.now() + timedelta(hours=2)

    kept = with_deadline(timezone.now() - timedelta(minutes=1))
    page = admin_client.post(
        changelist, {"action": "retry_sagas", "_selected_action": [str(kept.pk)], "index": "0"}
    )
    admin_client.post(
        changelist,
        {
            "action": "retry_sagas",
            "_selected_action": [str(kept.pk)],
            "post": "yes",
            "_once": page.context["once"],
            "deadline": "clear",
        },
    )
    assert Saga.objects.get(pk=kept.pk).deadline_at is None
    assert retried_detail(kept)["deadline"] is None


def test_a_retry_sent_again_after_its_new_deadline_passed_gets_its_first_answer():
    """Its first answer was lost; by the time it is sent again with its key, the deadline it
    chose has passed: the first answer, not a 400."""
    import time

    client = APIClient()
    client.force_authenticate(make_operator())
    saga = saga_rows()
    url = f"/api/sagas/{saga.pk}/retry/"
    soon = {"deadline": (timezone.now() + timedelta(seconds=0.5)).isoformat()}
    first = client.post(url, soon, format="json", HTTP_IDEMPOTENCY_KEY="soon-1")
    assert first.status_code == 202, first.content
    time.sleep(0.6)
    again = client.post(url, soon, format="json", HTTP_IDEMPOTENCY_KEY="soon-1")
    assert again.status_code == 202 and again["Idempotent-Replayed"] == "true"
    late = client.post(
        f"/api/sagas/{saga_rows().pk}/retry/", soon, format="json", HTTP_IDEMPOTENCY_KEY="k-2"
    )
    assert late.status_code == 400 and late.json() == {"deadline": ["Must be in the future."]}
    far = {"deadline": (timezone.now() + timedelta(days=365 * 101)).isoformat()}
    assert client.post(url, far, format="json").json() == {
        "deadline": ["At most 100 years from now."]
    }


def test_a_saga_past_its_pivot_gets_no_deadline():
    from sagas.definitions import snapshot_version

    saga = saga_rows("snapshot_demo", stopped_at=1)
    steps = list(saga.steps.order_by("index"))
    steps[0].definition = {**steps[0].definition, "pivot": True}
    steps[0].save(update_fields=["stored_definition"])
    version = snapshot_version([s.definition for s in steps])
    Saga.objects.filter(pk=saga.pk).update(definition_version=version)
    with pytest.raises(InvalidTransition, match="passed its pivot"):
        saga_retry(saga_id=saga.pk, actor="op", deadline=None)
    saga_retry(saga_id=saga.pk, actor="op")  # kept: allowed
