"""The order fulfilment saga with its shapes beyond a straight line (`ORDERS_RESERVE_EACH_LINE`:
each line's stock reserved at once, a group; `ORDERS_SHIP_AS_CHILD`: the shipment saga as its
child), on real workers: the outcomes of the test tokens and failures stay what they are for
the straight line (money, stock and final statuses), and each shape undoes what it did.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.test import override_settings

from inventory.models import Product, Reservation
from orders.models import Order
from orders.sagas import order_fulfilment
from orders.services import order_submit
from payments.models import GatewayCharge, Payment
from sagas.definitions import register
from sagas.models import EventKind, Saga, SagaEvent, SagaMember, SagaStep
from shipping.models import Shipment
from tests.conftest import ADDRESS, wait_final, wait_for
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])


@pytest.fixture(autouse=True)
def shapes():
    """The order saga as these settings make it, registered for this test (the workers run
    what the saga's rows hold: the definition it started with)."""
    with override_settings(ORDERS_RESERVE_EACH_LINE=True, ORDERS_SHIP_AS_CHILD=True):
        register(order_fulfilment())
        yield


def submit(lines, *, token="tok_ok", country="GB"):
    saga, _ = order_submit(
        customer=None,
        items=[{"sku": product.sku, "quantity": quantity} for product, quantity in lines],
        shipping_address={**ADDRESS, "country": country},
        payment_token=token,
    )
    return saga


def stock(product) -> int:
    return Product.objects.get(pk=product.pk).stock_on_hand


def money_held(saga) -> Decimal:
    charges = GatewayCharge.objects.filter(idempotency_key=f"{saga.pk}:charge_payment")
    return sum((c.amount for c in charges if c.status == "charged"), Decimal(0))


def test_an_order_reserves_each_line_at_once_and_ships_with_a_child_saga(saga_db):
    tee, mug = ProductFactory(stock_on_hand=10), ProductFactory(stock_on_hand=10)
    saga = wait_final(submit([(tee, 2), (mug, 1)]).pk, timeout=40)

    assert saga.status == "completed"
    assert [s.name for s in SagaStep.objects.filter(saga=saga).order_by("index")] == [
        "create_order",
        "charge_payment",
        "reserve_stock",
        "payment_confirmation",
        "shipment",
        "confirm_order",
    ]
    members = SagaMember.objects.filter(saga=saga).order_by("position")
    assert [(m.name, m.status) for m in members] == [
        (tee.sku, "completed"),
        (mug.sku, "completed"),
    ]
    assert (stock(tee), stock(mug)) == (8, 9)
    child = Saga.objects.get(parent=saga)
    assert (child.name, child.status) == ("shipment", "completed")
    order = Order.objects.get(pk=saga.input["order_id"])
    assert order.status == "confirmed"
    assert Shipment.objects.get(order_id=order.pk).status == "scheduled"
    label = SagaStep.objects.get(saga=saga, name="shipment").output["print_label"]["label"]
    assert label.startswith("labels/SG")


def test_a_line_short_of_stock_fails_its_member_and_the_other_lines_are_released(saga_db):
    tee, scarce = ProductFactory(stock_on_hand=10), ProductFactory(stock_on_hand=1)
    saga = wait_final(submit([(tee, 1), (scarce, 5)]).pk, timeout=40)

    assert (saga.status, saga.error_code) == ("compensated", "insufficient_stock")
    assert (stock(tee), stock(scarce)) == (10, 1)
    members = {m.name: m.status for m in SagaMember.objects.filter(saga=saga)}
    assert members[scarce.sku] == "failed"
    assert members[tee.sku] in ("compensated", "pending")  # reserved then released, or never
    assert not Reservation.objects.filter(order_id=saga.input["order_id"], status="active")
    assert money_held(saga) == 0
    assert Order.objects.get(pk=saga.input["order_id"]).status == "cancelled"
    assert not Saga.objects.filter(parent=saga).exists()


def test_an_unsupported_destination_compensates_the_child_and_then_the_order(saga_db):
    tee = ProductFactory(stock_on_hand=10)
    saga = wait_final(submit([(tee, 1)], country="AQ").pk, timeout=40)

    assert (saga.status, saga.error_code) == ("compensated", "unsupported_destination")
    child = Saga.objects.get(parent=saga)
    assert (child.status, child.error_code) == ("compensated", "unsupported_destination")
    assert stock(tee) == 10
    assert money_held(saga) == 0
    assert Payment.objects.get(order_id=saga.input["order_id"]).status == "refunded"
    undone = SagaEvent.objects.filter(saga=saga, kind=EventKind.STEP_COMPENSATED).order_by("id")
    # The child undid nothing of its own (its booking failed); the order's stages, last first.
    assert [e.step_name for e in undone][-3:] == [
        "reserve_stock.reserve_line",
        "charge_payment",
        "create_order",
    ]


def test_a_gateway_outage_still_pauses_before_any_line_is_reserved(saga_db):
    tee = ProductFactory(stock_on_hand=10)
    from payments.gateway import gateway_outage_begin, gateway_recover

    gateway_outage_begin()
    try:
        saga = submit([(tee, 1)], token="tok_timeout")
        wait_for(
            lambda: Saga.objects.get(pk=saga.pk).status == "failed",
            timeout=40,
            what="the saga to pause",
        )
    finally:
        gateway_recover()
    saga.refresh_from_db()
    assert saga.error_code == "gateway_unavailable"
    assert not SagaMember.objects.filter(saga=saga).exists()
    assert stock(tee) == 10
