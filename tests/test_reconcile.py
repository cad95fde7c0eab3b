"""Reconciliation: a final saga checked against the outside world (`SagaDefinition.reconcile`).

The order saga's check (`orders.reconcile`) asks the simulated gateway's ledger: a confirmed
order's charge held in full, a cancelled order's nothing. `tok_late_charge` declines at once,
and the issuer's approval lands a few seconds later from a process of its own: the saga
compensated, the customer paid. Real workers run the sagas; the sweeper runs here, as beat
would run it.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.db import connection
from django.utils import timezone

from payments.gateway import gateway_refund
from payments.models import GatewayCharge
from sagas import services
from sagas.definitions import Discrepancy, Repair, SagaDefinition, Step, register
from sagas.engine import reconcile, sweeper
from sagas.exceptions import InvalidTransition
from sagas.models import EventKind, Saga, SagaEvent
from sagas.signals import saga_discrepancy_cleared, saga_discrepancy_found
from tests.conftest import wait_final, wait_for
from tests.factories import ProductFactory
from tests.test_order_saga import submit

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])


def charge_of(saga) -> GatewayCharge | None:
    return GatewayCharge.objects.filter(idempotency_key=f"{saga.pk}:charge_payment").first()


def flag(saga) -> tuple[str, list]:
    saga = Saga.objects.get(pk=saga.pk)
    return saga.reconciliation, [d["code"] for d in saga.discrepancies or []]


def kinds(saga) -> list[str]:
    return list(SagaEvent.objects.filter(saga=saga).order_by("id").values_list("kind", flat=True))


def sweep():
    """One sweep, with every finished saga due for its check (again)."""
    with override(SAGAS_RECONCILE_AFTER=0, SAGAS_RECONCILE_EVERY=0):
        return sweeper.sweep(stale_after=timedelta(minutes=5))


def override(**values):
    from django.test import override_settings

    return override_settings(**values)


def test_a_late_charge_is_found_flagged_repaired_and_the_flag_clears(saga_db, admin_client):
    found = []
    saga_discrepancy_found.connect(lambda **kw: found.append(kw), weak=False)
    product = ProductFactory(stock_on_hand=5, price=Decimal("12.00"))
    saga = wait_final(submit(product, token="tok_late_charge").pk)
    assert (saga.status, saga.error_code) == ("compensated", "issuer_timeout")
    wait_for(lambda: charge_of(saga), timeout=20, what="the issuer's late approval to land")
    assert charge_of(saga).status == "charged"  # the customer paid for a cancelled order

    report = sweep()

    assert report.discrepant >= 1
    assert flag(saga) == ("discrepant", ["late_charge"])
    assert Saga.objects.get(pk=saga.pk).status == "compensated"  # never changed
    event = SagaEvent.objects.get(saga=saga, kind=EventKind.DISCREPANCY_FOUND)
    assert event.detail["discrepancies"][0]["repair"]["step"] == "charge_payment"
    assert [f["discrepancies"][0]["code"] for f in found if f["saga_id"] == saga.pk] == [
        "late_charge"
    ]
    body = admin_client.get(f"/api/sagas/{saga.pk}/").json()
    assert body["reconciliation"]["status"] == "discrepant"
    listed = admin_client.get("/api/sagas/?reconciliation=discrepant").json()["results"]
    assert str(saga.pk) in [s["id"] for s in listed]
    # Checked again with nothing new: no second event.
    reconcile.run_check(saga.pk)
    assert kinds(saga).count(EventKind.DISCREPANCY_FOUND) == 1

    index = list(saga.steps.order_by("index").values_list("name", flat=True)).index(
        "charge_payment"
    )
    plan = services.saga_plan(saga_id=saga.pk, action="repair", index=index)
    assert plan.allowed and "late_charge" in plan.reason and plan.undo == ("charge_payment",)
    # The admin: the flag in the list (and its filter), the buttons, the repair's preview.
    listing = admin_client.get("/admin/sagas/saga/", {"reconciliation__exact": "discrepant"})
    assert str(saga.pk)[:8] in listing.content.decode()
    assert "saga-discrepant" in listing.content.decode()
    page = admin_client.get(f"/admin/sagas/saga/{saga.pk}/change/")
    buttons = [button.name for button in page.context["saga_operator_actions"]]
    assert buttons == ["reconcile_sagas", "repair_sagas"]
    assert "late_charge" in page.content.decode()
    chosen = {"action": "repair_sagas", "_selected_action": [str(saga.pk)]}
    preview = admin_client.post("/admin/sagas/saga/", chosen).content.decode()
    assert "refund_payment" in preview and "late_charge" in preview
    assert charge_of(saga).status == "charged"  # a preview changes nothing
    admin_client.post("/admin/sagas/saga/", {**chosen, "post": "yes"})
    wait_for(lambda: flag(saga)[0] == "agrees", timeout=20, what="the repair to clear the flag")

    assert charge_of(saga).status == "refunded"
    assert Saga.objects.get(pk=saga.pk).status == "compensated"
    ran = SagaEvent.objects.get(saga=saga, kind=EventKind.REPAIR_RAN)
    assert (ran.step_name, ran.detail["actor"]) == ("charge_payment", "admin")
    assert kinds(saga)[-2:] == [EventKind.REPAIR_RAN, EventKind.DISCREPANCY_CLEARED]
    # The repair is no longer offered.
    assert not services.saga_plan(saga_id=saga.pk, action="repair", index=index).allowed


def test_a_completed_saga_whose_charge_was_refunded_outside_is_flagged(saga_db):
    product = ProductFactory(stock_on_hand=5, price=Decimal("7.00"))
    saga = wait_final(submit(product).pk)
    assert saga.status == "completed"
    services.saga_reconcile(saga_id=saga.pk, actor="ops")
    assert flag(saga) == ("agrees", [])

    gateway_refund(idempotency_key=f"{saga.pk}:charge_payment")  # by hand, at the gateway
    report = sweep()

    assert flag(saga) == ("discrepant", ["charge_missing"])
    assert report.discrepant >= 1
    discrepancy = Saga.objects.get(pk=saga.pk).discrepancies[0]
    assert "repair" not in discrepancy  # nothing the saga can run: an operator's matter
    assert Saga.objects.get(pk=saga.pk).status == "completed"


def test_the_check_never_runs_on_a_saga_in_flight(saga_db):
    product = ProductFactory(stock_on_hand=5)
    saga = submit(product, token="tok_timeout")  # the gateway's outage: the saga pauses
    wait_for(lambda: Saga.objects.get(pk=saga.pk).status == "failed", what="the pause")

    plan = services.saga_plan(saga_id=saga.pk, action="reconcile")
    assert not plan.allowed and "final" in plan.reason
    with pytest.raises(InvalidTransition):
        services.saga_reconcile(saga_id=saga.pk, actor="ops")
    sweep()

    assert flag(saga) == ("unchecked", [])
    assert Saga.objects.get(pk=saga.pk).reconciled_at is None


# -- a check of the test's own ---------------------------------------------------------------

CALLS: list[str] = []
# The sagas whose world agrees again (their discrepancy was repaired outside).
FIXED: set[str] = set()


def flaky_check(ctx) -> list[Discrepancy]:
    CALLS.append(ctx.input["mode"])
    if str(ctx.saga_id) in FIXED:
        return []
    if ctx.input["mode"] == "raise":
        raise ConnectionError("the ledger is down")
    if ctx.input["mode"] == "bad":
        return [Discrepancy("ledger_mismatch", "The ledger disagrees.")]
    if ctx.input["mode"] == "query_fails":  # its transaction would be left aborted
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1/0")
    if ctx.input["mode"] == "not_json":
        return [Discrepancy("ledger", "x", repair=Repair("only", note=object()))]  # type: ignore[arg-type]
    if ctx.input["mode"] == "many":
        return [Discrepancy(f"c{i}", "The ledger \x00 disagrees. " * 100) for i in range(500)]
    return []


def noop(ctx) -> dict:
    return {}


register(SagaDefinition("reconciled_in_process", [Step("only", noop)], reconcile=flaky_check))


def finished(mode: str, *, ago: timedelta = timedelta(minutes=2)) -> Saga:
    saga, _ = services.saga_start(name="reconciled_in_process", input={"mode": mode})
    Saga.objects.filter(pk=saga.pk).update(status="completed", finished_at=timezone.now() - ago)
    return saga


def test_a_check_that_raises_is_recorded_retried_and_never_breaks_the_sweep(transactional_db):
    CALLS.clear()
    broken, bad, good = finished("raise"), finished("bad"), finished("good")
    old = finished("bad", ago=timedelta(days=3))  # out of the window

    report = reconcile.sweep(batch_size=10)

    assert (report.checked, report.discrepant, report.failed) == (3, 1, 1)
    assert sorted(CALLS) == ["bad", "good", "raise"]
    failed = SagaEvent.objects.get(saga=broken, kind=EventKind.RECONCILE_FAILED)
    assert failed.detail["exception"] == "builtins.ConnectionError"
    assert "the ledger is down" not in str(failed.detail)
    assert flag(broken) == ("unchecked", [])
    assert flag(bad) == ("discrepant", ["ledger_mismatch"])
    assert flag(good) == ("agrees", [])
    assert flag(old) == ("unchecked", [])
    # Nothing is due again before SAGAS_RECONCILE_EVERY; then the broken one runs again.
    assert reconcile.sweep(batch_size=10).checked == 0
    later = timezone.now() + timedelta(hours=2)
    assert reconcile.sweep(now=later, batch_size=10).failed == 1
    assert SagaEvent.objects.filter(saga=broken, kind=EventKind.RECONCILE_FAILED).count() == 2

    # The world agrees again: the flag clears, on the timeline and by the signal.
    cleared = []
    saga_discrepancy_cleared.connect(lambda **kw: cleared.append(kw["saga_id"]), weak=False)
    FIXED.add(str(bad.pk))
    assert reconcile.run_check(bad.pk).status == "agrees"
    assert flag(bad) == ("agrees", [])
    assert kinds(bad)[-1] == EventKind.DISCREPANCY_CLEARED
    assert cleared == [bad.pk]


def test_a_check_that_breaks_its_query_or_answers_garbage_fails_alone(transactional_db):
    CALLS.clear()
    broken = [finished(mode) for mode in ("query_fails", "not_json")]
    many, good = finished("many"), finished("good")

    report = sweeper.sweep(stale_after=timedelta(minutes=5))  # the whole sweep goes on

    assert report.reconciled == 4
    for saga in broken:
        assert SagaEvent.objects.filter(saga=saga, kind=EventKind.RECONCILE_FAILED).exists()
        assert flag(saga) == ("unchecked", [])
    assert flag(good) == ("agrees", [])
    # At most MAX_DISCREPANCIES are kept, each message bounded, and no text PostgreSQL refuses.
    stored = Saga.objects.get(pk=many.pk).discrepancies
    assert len(stored) == reconcile.MAX_DISCREPANCIES + 1 and stored[-1]["code"] == "more"
    assert all(len(d["message"]) <= 500 and "\x00" not in d["message"] for d in stored)
    with pytest.raises(Exception, match="1 to 100 characters"):
        Discrepancy(["a"], "x")  # type: ignore[arg-type]
