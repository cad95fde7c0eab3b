"""The framework on a project of `sagas` alone: no domain app, no reference settings.

A saga's failure matrix on the test kit's worker (every step failing in every way, each case
checked against the framework's guarantees), then the admin and the API over the sagas it left;
a saga with waits through its matrix (each wait's event early, on time, twice, invalid, failing
the wait, never, late, racing its timeout, an abort while it waits), one with an approval
(approved, rejected, twice, approved then rejected, before the saga waits, never, racing its
timeout, an abort), and the kit's helpers for a project's tests.
"""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import Client
from django.urls import reverse

from sagas import SignalError, registered, saga_start
from sagas.models import Saga, SagaSignal, SagaStep
from sagas.testing import FailureMatrix, decide, expire_wait, send_signal, wait_for

MATRIX = FailureMatrix(
    "transfer", make_input=lambda: {"transfer_id": uuid.uuid4().hex, "amount": 10}
)
pytestmark = [pytest.mark.system, pytest.mark.django_db(transaction=True)]


def confirmation(saga: Saga) -> dict:
    """The provider's confirmation of this payment."""
    return {"reference": f"3ds-{saga.input['payment_id']}"}


def captured_what_was_confirmed(saga: Saga) -> None:
    """A payment is captured only with its confirmation's reference, and only once confirmed
    and cooled off; one that did not complete captured nothing."""
    steps = {step.name: step for step in saga.steps.all()}
    if saga.status == "completed":
        assert steps["confirmed"].output == confirmation(saga), steps["confirmed"].output
        assert steps["cooling_off"].output is None  # a timer's time passed
        assert steps["capture"].output == {"captured": confirmation(saga)["reference"]}
    else:
        assert steps["capture"].status in ("pending", "failed"), steps["capture"].status


PAYMENT = FailureMatrix(
    "card_payment",
    make_input=lambda: {"payment_id": uuid.uuid4().hex, "amount": 10},
    invariant=captured_what_was_confirmed,
    payloads={"payment_confirmed": confirmation},
    invalid_payloads={"payment_confirmed": [{}, {"reference": ""}, "3ds-ok"]},
)


@MATRIX.parametrize()
def test_transfer(saga_worker, case):
    case.run(saga_worker).assert_guarantees()


def test_the_cases_of_a_saga_with_waits_follow_its_definition():
    assert [case.id for case in PAYMENT.cases()] == [
        "hold fails for good",
        "capture fails for good",
        "hold retries exhausted (compensate)",
        "capture retries exhausted (compensate)",
        "release fails for good (compensation of hold)",
        "every message delivered twice",
        "every message delivered twice, capture fails for good",
        "payment_confirmed sent early",
        "payment_confirmed sent on time",
        "payment_confirmed sent twice",
        "payment_confirmed sent with an invalid payload",
        "payment_confirmed fails the wait",
        "payment_confirmed never sent (timeout: compensate)",
        "payment_confirmed sent after the timeout",
        "payment_confirmed sent as the timeout fires",
        "aborted while waiting for payment_confirmed",
        "cooling_off times out",
    ]
    never = PAYMENT.case("payment_confirmed never sent (timeout: compensate)").expected
    assert (never.status, never.error_code, never.compensated) == (
        "compensated",
        "wait_timed_out",
        ("hold",),
    )
    assert never.steps == {
        "hold": "compensated",
        "confirmed": "failed",
        "cooling_off": "pending",
        "capture": "pending",
    }
    aborted = PAYMENT.case("aborted while waiting for payment_confirmed").expected
    assert (aborted.status, aborted.error_code, aborted.steps["confirmed"]) == (
        "compensated",
        "",
        "pending",
    )
    race = PAYMENT.case("payment_confirmed sent as the timeout fires")
    assert (race.expected.status, race.if_timed_out and race.if_timed_out.status) == (
        "completed",
        "compensated",
    )
    failed = PAYMENT.case("payment_confirmed fails the wait").expected
    assert (failed.status, failed.error_code, failed.compensated) == (
        "compensated",
        "kit_failed",
        ("hold",),
    )


@PAYMENT.parametrize()
def test_card_payment(saga_worker, case):
    case.run(saga_worker).assert_guarantees()


def shipped_only_once_approved(saga: Saga) -> None:
    """An order ships only once approved, by the approver the decision names; one that did
    not complete shipped nothing."""
    steps = {step.name: step for step in saga.steps.all()}
    if saga.status == "completed":
        decision = steps["manager_review"].output or {}
        assert decision.get("decision") == "approved" and decision.get("by") == "test-kit"
        assert steps["ship"].output == {
            "shipped": saga.input["order_id"],
            "approved_by": "test-kit",
        }
    else:
        assert steps["ship"].status in ("pending", "failed"), steps["ship"].status


LARGE_ORDER = FailureMatrix(
    "large_order",
    make_input=lambda: {"order_id": uuid.uuid4().hex, "amount": 2000},
    invariant=shipped_only_once_approved,
)


def test_the_cases_of_a_saga_with_an_approval_follow_its_definition():
    assert [case.id for case in LARGE_ORDER.cases() if case.scenario is not None] == [
        "manager_review approved",
        "manager_review rejected",
        "manager_review approved twice",
        "manager_review approved, then rejected",
        "manager_review decided before the saga waits for it",
        "manager_review never decided (timeout: compensate)",
        "manager_review decided as the timeout fires",
        "aborted while waiting for manager_review",
    ]
    rejected = LARGE_ORDER.case("manager_review rejected").expected
    assert (rejected.status, rejected.error_code, rejected.compensated) == (
        "compensated",
        "approval_rejected",
        ("authorize", "reserve"),
    )
    assert rejected.steps == {
        "reserve": "compensated",
        "authorize": "compensated",
        "manager_review": "failed",
        "ship": "pending",
    }


@LARGE_ORDER.parametrize()
def test_large_order(saga_worker, case):
    case.run(saga_worker).assert_guarantees()


def test_the_kits_helpers_decide_an_approval(saga_worker):
    """In a project's own test: an order approved once it waits for its review, another one
    rejected; a decision after the approval is over is refused, the same one again repeated."""
    order, _ = saga_start(name="large_order", input={"order_id": "o-1", "amount": 2000})
    outcome = decide(order, approve=True, note="Known customer", when_waiting=True, timeout=20)
    assert (outcome.status, outcome.stage) == ("consumed", "manager_review")
    assert final(order) == "completed"
    review = SagaStep.objects.get(saga=order, name="manager_review")
    assert review.output == {"decision": "approved", "by": "test-kit", "note": "Known customer"}
    shipped = SagaStep.objects.get(saga=order, name="ship").output
    assert shipped == {"shipped": "o-1", "approved_by": "test-kit"}
    assert decide(order, approve=True, note="Known customer").repeated

    refused, _ = saga_start(name="large_order", input={"order_id": "o-2", "amount": 2000})
    outcome = decide(refused, approve=False, actor="alice", when_waiting=True, timeout=20)
    assert outcome.status == "consumed"
    assert final(refused) == "compensated"
    assert Saga.objects.get(pk=refused.pk).error_code == "approval_rejected"
    assert decide(refused.pk, approve=True, actor="bob").status == "refused"

    # Before the saga waits at its approval (here: before its start commits), a decision is
    # refused, and stores nothing; at a wait that is no approval, the kit says where it waits.
    with transaction.atomic():
        early, _ = saga_start(name="large_order", input={"order_id": "o-3", "amount": 2000})
        with pytest.raises(SignalError, match="not waiting for the approval"):
            decide(early, approve=True)
    assert not SagaSignal.objects.filter(saga=early).exists()
    payment, _ = saga_start(name="card_payment", input={"payment_id": "p-4", "amount": 10})
    with pytest.raises(AssertionError, match="it waits at confirmed instead, not an approval"):
        decide(payment, approve=True, when_waiting=True, timeout=20)


def test_the_kits_helpers_send_a_signal_and_expire_a_wait(saga_worker):
    """In a project's own test: the event once the saga waits for it, then the timer's time
    passes at once; another payment's confirmation never comes, and its timeout compensates
    it."""
    saga, _ = saga_start(name="card_payment", input={"payment_id": "p-1", "amount": 10})
    outcome = send_signal(
        saga, "payment_confirmed", {"reference": "3ds-p-1"}, when_waiting=True, timeout=20
    )
    assert (outcome.status, outcome.stage) == ("consumed", "confirmed")
    assert expire_wait(saga, "cooling_off", timeout=20) is True
    assert final(saga) == "completed"
    assert SagaStep.objects.get(saga=saga, name="capture").output == {"captured": "3ds-p-1"}
    with pytest.raises(AssertionError, match="it ended completed first"):
        expire_wait(saga, timeout=5)

    unconfirmed, _ = saga_start(name="card_payment", input={"payment_id": "p-2", "amount": 10})
    assert expire_wait(unconfirmed.pk, timeout=20) is True  # its first wait: the confirmation
    assert final(unconfirmed) == "compensated"
    late = send_signal(unconfirmed, "payment_confirmed", {"reference": "3ds-p-2"})
    assert late.status == "refused"
    assert SagaSignal.objects.get(pk=late.signal_id).status == "refused"


def final(saga: Saga) -> str:
    """The saga's status once it ended."""

    def status() -> str:
        return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)

    wait_for(lambda: status() in ("completed", "compensated", "failed"), timeout=20)
    return status()


def test_the_admin_and_the_api_on_a_project_of_sagas_alone(saga_worker):
    assert set(registered()) == {"transfer", "card_payment", "large_order"}
    case = next(c for c in MATRIX.cases() if "fails for good" in str(c))
    case.run(saga_worker).assert_guarantees()
    saga = Saga.objects.get()
    staff = get_user_model().objects.create_superuser("operator", "op@example.com", "x")
    client = Client()
    client.force_login(staff)
    listed = client.get(reverse("admin:sagas_saga_changelist"))
    assert listed.status_code == 200 and str(saga.pk)[:8] in listed.content.decode()
    page = client.get(reverse("admin:sagas_saga_change", args=[saga.pk]))
    assert page.status_code == 200 and "saga-diagram" in page.content.decode()
    detail = client.get(f"/api/sagas/{saga.pk}/")
    assert detail.status_code == 200
    assert detail.json()["status"] == saga.status
    assert [step["name"] for step in detail.json()["steps"]] == ["debit", "credit", "notify"]
