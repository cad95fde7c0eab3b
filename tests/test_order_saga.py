"""The order fulfilment saga end to end, on real workers, PostgreSQL and Redis."""

from __future__ import annotations

import threading
from decimal import Decimal
from typing import Any

import pytest
from django.db import connection

from inventory.models import Product, Reservation
from orders.models import Order
from orders.sagas import ORDER_FULFILMENT
from orders.services import order_submit
from payments.models import GatewayCharge, Payment
from sagas import engine
from sagas.definitions import Wait
from sagas.models import EventKind, Saga, SagaEvent, SagaStep
from sagas.services import (
    saga_compensate,
    saga_retry,
    saga_signal,
    saga_start,
    saga_step_resolve,
)
from sagas.testing import FailureMatrix
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from shipping.models import Shipment
from tests.conftest import ADDRESS, attempt_in_process, lose_messages, wait_final
from tests.factories import ProductFactory, UserFactory

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])

STEP_NAMES = [step.name for step in ORDER_FULFILMENT.steps]
# The waits (payment_confirmation): skipped by every card but a 3-D Secure one.
WAIT_NAMES = [step.name for step in ORDER_FULFILMENT.steps if isinstance(step, Wait)]


def submit(product, *, quantity=1, token="tok_ok", country="GB", key=None, user=None):
    saga, _ = order_submit(
        customer=user,
        items=[{"sku": product.sku, "quantity": quantity}],
        shipping_address={**ADDRESS, "country": country},
        payment_token=token,
        idempotency_key=key,
    )
    return saga


def order_of(saga: Saga) -> Order | None:
    return Order.objects.filter(pk=saga.input["order_id"]).first()


def charges_for(saga: Saga):
    return GatewayCharge.objects.filter(idempotency_key=f"{saga.pk}:charge_payment")


def step_statuses(saga: Saga) -> list[str]:
    return list(
        SagaStep.objects.filter(saga=saga).order_by("index").values_list("status", flat=True)
    )


def compensation_order(saga: Saga) -> list[str]:
    return list(
        saga.events.filter(kind=EventKind.STEP_COMPENSATED)
        .order_by("id")
        .values_list("step_name", flat=True)
    )


def test_happy_path(saga_db):
    product = ProductFactory(stock_on_hand=10, price=Decimal("12.50"))
    saga = wait_final(submit(product, quantity=2).pk)

    assert saga.status == "completed"
    assert step_statuses(saga) == ["completed"] * len(STEP_NAMES)
    order = order_of(saga)
    assert order is not None and order.status == "confirmed"
    assert order.total == Decimal("25.00")
    assert charges_for(saga).count() == 1
    assert charges_for(saga).get().amount == Decimal("25.00")
    assert Payment.objects.get(order_id=order.pk).status == "charged"
    product.refresh_from_db()
    assert product.stock_on_hand == 8
    assert Shipment.objects.get(order_id=order.pk).status == "scheduled"
    kinds = list(saga.events.order_by("id").values_list("kind", "step_name"))
    assert kinds == [
        (EventKind.SAGA_STARTED, ""),
        *[
            (EventKind.WAIT_SKIPPED if name in WAIT_NAMES else EventKind.STEP_COMPLETED, name)
            for name in STEP_NAMES
        ],
        (EventKind.SAGA_COMPLETED, ""),
    ]


# -- the failure matrix, on the test kit ----------------------------------------------------

INITIAL_STOCK, QUANTITY = 10, 3


def order_input() -> dict[str, Any]:
    """A product of its own with 10 in stock, and an order for 3 of it, paid with a 3-D Secure
    card the gateway never confirms: the saga waits at payment_confirmation, where the kit
    sends the confirmation (or plays the case's scenario)."""
    product = ProductFactory(stock_on_hand=INITIAL_STOCK)
    return {
        "customer": None,
        "items": [{"sku": product.sku, "quantity": QUANTITY}],
        "shipping_address": ADDRESS,
        "payment_token": "tok_3ds_abandoned",
    }


def confirmation(saga: Saga) -> dict[str, str]:
    """The gateway's confirmation, as its webhook would post it."""
    return {"type": "payment.confirmed", "charge_id": f"ch_{saga.pk.hex[:24]}"}


def the_books_balance(saga: Saga) -> None:
    """The shop's promise, however the saga ended: stock is never lost or made up; a completed
    order is confirmed, charged its total once, reserved and shipped; a compensated one is
    cancelled (or was never created) with every charge refunded and its stock restored; one
    left for an operator is not confirmed and charged all or nothing."""
    order, total = order_of(saga), Decimal(saga.input["total"])
    held = sum(c.amount for c in charges_for(saga) if c.status == "charged")
    (line,) = saga.input["items"]
    on_hand = Product.objects.get(sku=line["sku"]).stock_on_hand
    active = Reservation.objects.filter(order_id=saga.input["order_id"], status="active")
    reserved = sum(r.quantity for r in active)
    shipped = Shipment.objects.filter(order_id=saga.input["order_id"], status="scheduled")
    paid = Payment.objects.filter(order_id=saga.input["order_id"], status="charged").count()
    assert on_hand + reserved == INITIAL_STOCK, f"stock: {on_hand} on hand, {reserved} reserved"
    if saga.status == "completed":
        assert order is not None and order.status == "confirmed"
        assert (held, charges_for(saga).count(), paid) == (total, 1, 1), "charged once, its total"
        assert (reserved, shipped.count()) == (line["quantity"], 1)
    elif saga.status == "compensated":
        assert order is None or order.status == "cancelled", f"order {order and order.status}"
        assert (held, paid) == (0, 0), f"{held} charged and not refunded"
        assert (reserved, shipped.count()) == (0, 0), "stock still reserved, or shipped"
    else:
        assert order is None or order.status == "pending", f"order {order and order.status}"
        assert held in (0, total), f"{held} charged of {total}"


MATRIX = FailureMatrix(
    ORDER_FULFILMENT,
    make_input=order_input,
    start=lambda order: order_submit(**order),
    invariant=the_books_balance,
    payloads={"payment_confirmed": confirmation},
    invalid_payloads={"payment_confirmed": [{"type": "payment.failed", "charge_id": "ch_1"}]},
)


@MATRIX.parametrize()
def test_failure_matrix(saga_db, case):
    """Each step failing for good, out of retries, each compensation failing, every message
    delivered twice: the framework's guarantees and the shop's books hold."""
    case.run(saga_db).assert_guarantees()


@pytest.mark.parametrize(
    ("token", "country", "quantity", "failed_step", "code"),
    [
        ("tok_declined", "GB", 1, "charge_payment", "card_declined"),
        ("tok_insufficient_funds", "GB", 1, "charge_payment", "insufficient_funds"),
        ("tok_ok", "GB", 11, "reserve_inventory", "insufficient_stock"),
        ("tok_ok", "AQ", 1, "schedule_shipment", "unsupported_destination"),
    ],
)
def test_business_failures_of_the_domain(saga_db, token, country, quantity, failed_step, code):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, quantity=quantity, token=token, country=country).pk)
    assert saga.status == "compensated"
    assert saga.error_code == code
    flagged = next(s for s in ORDER_FULFILMENT.steps if s.name == failed_step)
    expected = "compensated" if flagged.compensate_failed_step else "failed"
    assert SagaStep.objects.get(saga=saga, name=failed_step).status == expected
    assert order_of(saga).status == "cancelled"
    product.refresh_from_db()
    assert product.stock_on_hand == 10


def test_amount_over_the_limit_is_declined(saga_db):
    product = ProductFactory(stock_on_hand=10, price=Decimal("6000.00"))
    saga = wait_final(submit(product, quantity=2).pk)
    assert saga.status == "compensated"
    assert saga.error_code == "amount_over_limit"
    assert charges_for(saga).filter(status="charged").count() == 0


def test_transient_failures_are_retried(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_transient_2").pk)
    assert saga.status == "completed"
    payment_step = SagaStep.objects.get(saga=saga, name="charge_payment")
    assert payment_step.attempts == 3
    assert saga.events.filter(kind=EventKind.STEP_RETRYING).count() == 2
    assert charges_for(saga).count() == 1


def test_payment_out_of_retries_pauses_and_retry_completes(saga_db):
    result = MATRIX.case("charge_payment retries exhausted (pause)").run(saga_db)
    result.assert_guarantees()  # paused at the payment, nothing undone, the order pending
    assert result.saga.current_step == STEP_NAMES.index("charge_payment")
    assert order_of(result.saga).status == "pending"

    result.clear_faults()  # the gateway is back
    saga_retry(saga_id=result.saga.pk, actor="test")
    # The customer confirms (kept until the saga waits for it).
    payload = confirmation(result.saga)
    saga_signal(saga_id=result.saga.pk, event="payment_confirmed", payload=payload)
    saga = wait_final(result.saga.pk)
    assert saga.status == "completed"
    the_books_balance(saga)
    create = SagaStep.objects.get(saga=saga, name="create_order")
    assert create.attempts == 1
    assert saga.events.filter(kind=EventKind.STEP_COMPLETED, step_name="create_order").count() == 1


REFUND_FAILS = "refund_payment fails for good (compensation of charge_payment)"


def test_compensation_failure_then_retry_finishes_it(saga_db):
    result = MATRIX.case(REFUND_FAILS).run(saga_db)
    result.assert_guarantees()  # failed for an operator, create_order still owed
    assert order_of(result.saga).status == "pending"

    result.clear_faults()  # the fault is fixed
    saga_retry(saga_id=result.saga.pk, actor="test")
    saga = wait_final(result.saga.pk)
    assert saga.status == "compensated"
    assert compensation_order(saga) == ["reserve_inventory", "charge_payment", "create_order"]
    assert charges_for(saga).get().status == "refunded"
    the_books_balance(saga)


def test_resolve_marks_the_step_handled_and_continues(saga_db):
    result = MATRIX.case(REFUND_FAILS).run(saga_db)
    result.assert_guarantees()

    index = STEP_NAMES.index("charge_payment")
    saga_step_resolve(saga_id=result.saga.pk, index=index, actor="operator")
    saga = wait_final(result.saga.pk)
    assert saga.status == "compensated"
    assert saga.events.filter(kind=EventKind.OPERATOR_RESOLVE, step_name="charge_payment").exists()
    assert order_of(saga).status == "cancelled"
    # Resolved by hand: the framework did not refund through the gateway.
    assert charges_for(saga).get().status == "charged"


def test_operator_compensate_aborts_a_paused_saga(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_timeout").pk)
    assert saga.status == "failed"
    saga_compensate(saga_id=saga.pk, actor="operator")
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    # The failed payment step is compensated too (compensate_failed_step): nothing was charged.
    assert compensation_order(saga) == ["charge_payment", "create_order"]
    assert order_of(saga).status == "cancelled"


def test_error_callback_thrice_sends_one_compensation(saga_db, monkeypatch):
    product = ProductFactory(stock_on_hand=10)
    # Drive the forward steps by hand, so the failure is ours to report.
    lose_messages(monkeypatch)
    saga = submit(product, country="AQ")
    for index in range(3):
        assert attempt_in_process(saga.pk, index) == "done"
    # (payment_confirmation, a tok_ok card's, was skipped as reserve_inventory completed.)
    ship = STEP_NAMES.index("schedule_shipment")
    assert attempt_in_process(saga.pk, ship) == "fail"  # unsupported destination
    monkeypatch.undo()
    epoch = Saga.objects.get(pk=saga.pk).epoch

    def callback() -> None:
        engine.step_chain_failed(str(saga.pk), epoch)
        connection.close()

    threads = [threading.Thread(target=callback) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    callback()  # and once more, after the fact

    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert Saga.objects.get(pk=saga.pk).epoch == epoch + 1  # one chain of compensations
    assert saga.events.filter(kind=EventKind.COMPENSATION_STARTED).count() == 1
    assert compensation_order(saga) == ["reserve_inventory", "charge_payment", "create_order"]
    assert not saga.events.filter(kind=EventKind.DUPLICATE_IGNORED).exists()
    assert charges_for(saga).get().status == "refunded"
    product.refresh_from_db()
    assert product.stock_on_hand == 10


def test_start_with_the_same_idempotency_key_gives_one_saga(saga_db):
    product = ProductFactory(stock_on_hand=10)
    user = UserFactory()
    results: list[Saga] = []

    def place() -> None:
        results.append(submit(product, key="order-123", user=user))
        connection.close()

    threads = [threading.Thread(target=place) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({saga.pk for saga in results}) == 1
    assert Saga.objects.count() == 1
    saga = wait_final(results[0].pk)
    assert saga.status == "completed"
    assert Order.objects.count() == 1


def test_same_key_and_name_through_the_framework(saga_db):
    first, created = saga_start(name="snapshot_demo", input={}, idempotency_key="k1")
    again, created_again = saga_start(name="snapshot_demo", input={}, idempotency_key="k1")
    assert created and not created_again and first.pk == again.pk


def test_lost_gateway_response_charges_once(saga_db):
    product = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit(product, token="tok_lost_response").pk)
    assert saga.status == "completed"
    assert charges_for(saga).count() == 1
    assert SagaStep.objects.get(saga=saga, name="charge_payment").attempts == 2


def test_crash_after_the_external_call_before_commit_charges_once(saga_db):
    """The gateway charged, then the step's transaction failed: the retry must not charge."""
    product = ProductFactory(stock_on_hand=10)
    Fault.objects.create(
        step_name="charge_payment",
        point=FaultPoint.AFTER_ACTION,
        effect=FaultEffect.TRANSIENT_ERROR,
        remaining=1,
    )
    saga = wait_final(submit(product).pk)
    assert saga.status == "completed"
    assert charges_for(saga).count() == 1
    assert Payment.objects.filter(order_id=saga.input["order_id"]).count() == 1
    assert SagaStep.objects.get(saga=saga, name="charge_payment").attempts == 2


def test_no_oversell_under_concurrency(saga_db):
    stock = 5
    product = ProductFactory(stock_on_hand=stock)
    sagas = [submit(product) for _ in range(3 * stock)]
    finals = [wait_final(saga.pk, timeout=90) for saga in sagas]

    statuses = sorted(saga.status for saga in finals)
    assert statuses.count("completed") == stock
    assert statuses.count("compensated") == 2 * stock
    assert Order.objects.filter(status="confirmed").count() == stock
    product.refresh_from_db()
    assert product.stock_on_hand == 0
    assert Reservation.objects.filter(status="active").count() == stock
    # Steps ran on whichever worker process was free: more than one took part.
    workers = {
        detail["worker"]
        for detail in SagaEvent.objects.filter(kind=EventKind.STEP_COMPLETED).values_list(
            "detail", flat=True
        )
    }
    assert len(workers) >= 2
