"""The order fulfilment saga: create the order, charge it, reserve its stock, wait for a 3-D
Secure card's confirmation and for an operator's review where either is due, ship it.

Two settings give it the shapes beyond a straight line: `ORDERS_RESERVE_EACH_LINE` reserves
each line's stock at once (a group mapped over the lines), and `ORDERS_SHIP_AS_CHILD` ships
with the shipment saga (`shipping.sagas`: book a carrier, print a label) as its child, then
confirms the order in a last step."""

from __future__ import annotations

from django.conf import settings

from inventory.steps import (
    line_sku,
    order_lines,
    release_inventory,
    release_line,
    reserve_inventory,
    reserve_line,
)
from orders.reconcile import order_ledger
from orders.services import ORDER_FULFILMENT_SAGA, order_review_threshold
from orders.steps import (
    cancel_order,
    confirm_order,
    create_order,
    order_needs_review,
    shipment_input,
)
from payments.gateway import GatewayUnavailable
from payments.steps import (
    PAYMENT_CONFIRMED,
    charge_payment,
    confirmation_is_valid,
    payment_needs_confirmation,
    refund_payment,
)
from sagas.definitions import (
    Approval,
    Child,
    Group,
    RetryPolicy,
    SagaDefinition,
    Step,
    Wait,
    register,
)
from shipping.sagas import SHIPMENT_SAGA
from shipping.steps import cancel_shipment, schedule_shipment

# Compensations retry longer than steps (6 attempts against 4), with short waits: the
# reference saga's failures are brief. A real deployment tunes these to its systems.
COMPENSATION_RETRY = RetryPolicy(max_attempts=6, backoff=0.25, backoff_max=4.0)
# Seconds an attempt of any of its steps may take (the drill shortens it to kill hung steps).
TIME_LIMIT = int(getattr(settings, "ORDERS_STEP_TIME_LIMIT", 60))
# An order no one reviewed in three days is cancelled and refunded.
REVIEW_TIMEOUT = 3 * 86400
# The most lines an order's stock is reserved for at once (`ORDERS_RESERVE_EACH_LINE`).
MAX_LINES = 100


def _reserve() -> Step | Group:
    """Reserve the order's stock: in one step, or each line at once (a member per line, named
    by its SKU; one line short of stock undoes the others)."""
    if not getattr(settings, "ORDERS_RESERVE_EACH_LINE", False):
        return Step(
            "reserve_inventory",
            reserve_inventory,
            release_inventory,
            compensation_retry=COMPENSATION_RETRY,
            time_limit=TIME_LIMIT,
        )
    return Group(
        "reserve_stock",
        items=order_lines,
        key=line_sku,
        step=Step(
            "reserve_line",
            reserve_line,
            release_line,
            compensation_retry=COMPENSATION_RETRY,
            time_limit=TIME_LIMIT,
        ),
        max_fan_out=MAX_LINES,
    )


def _ship() -> list[Step | Child]:
    """Ship the order: a step, or the shipment saga as a child, then a step that confirms the
    order (a saga's last stage is a step)."""
    if not getattr(settings, "ORDERS_SHIP_AS_CHILD", False):
        return [
            Step(
                "schedule_shipment",
                schedule_shipment,
                cancel_shipment,
                compensation_retry=COMPENSATION_RETRY,
                time_limit=TIME_LIMIT,
            )
        ]
    return [
        Child("shipment", saga=SHIPMENT_SAGA, input=shipment_input),
        Step("confirm_order", confirm_order, time_limit=TIME_LIMIT),
    ]


def order_fulfilment() -> SagaDefinition:
    """The definition, as this process's settings make it: `ORDERS_CONFIRM_TIMEOUT`, and the
    review only where `ORDERS_REVIEW_ABOVE` is set. A saga keeps the definition it started
    with (its rows hold it), so these are read where orders are submitted."""
    ship = _ship()
    review: list[Step | Wait] = []
    if order_review_threshold() is not None:
        # Only orders above the threshold wait for it (the condition reads the saga's total);
        # rejected, the order is cancelled, its stock released and its payment refunded.
        review = [Approval("review", timeout=REVIEW_TIMEOUT, condition=order_needs_review)]
    return SagaDefinition(
        name=ORDER_FULFILMENT_SAGA,
        steps=[
            Step(
                "create_order",
                create_order,
                cancel_order,
                compensation_retry=COMPENSATION_RETRY,
                time_limit=TIME_LIMIT,
            ),
            Step(
                "charge_payment",
                charge_payment,
                refund_payment,
                retry=RetryPolicy(
                    max_attempts=4,
                    backoff=0.2,
                    backoff_max=2.0,
                    transient=(GatewayUnavailable,),
                ),
                compensation_retry=COMPENSATION_RETRY,
                # A gateway that stays down is an outage, not a reason to cancel the order:
                # an operator retries once it is back.
                on_exhausted="pause",
                # The gateway may have charged even though the step failed (a lost response):
                # compensating the failed step refunds such a charge.
                compensate_failed_step=True,
                time_limit=TIME_LIMIT,
            ),
            _reserve(),
            # A 3-D Secure card (tok_3ds*): the stock is held while the customer confirms, and
            # the gateway's webhook, at the signed URL the charge handed it, ends the wait. No
            # confirmation in time: the order is cancelled, refunded, its stock released.
            # Every other card skips it.
            Wait(
                "payment_confirmation",
                event=PAYMENT_CONFIRMED,
                timeout=float(getattr(settings, "ORDERS_CONFIRM_TIMEOUT", 900)),
                validate=confirmation_is_valid,
                condition=payment_needs_confirmation,
                max_payload_bytes=4096,
            ),
            *review,
            *ship,
        ],
        # The order is confirmed with the last step (the shipment saga's parent: its own).
        on_complete=None if ship[-1].name == "confirm_order" else confirm_order,
        # An order's sagas are found by its id (the admin, `GET /api/sagas/?key=`), and an
        # order is never fulfilled by two sagas at once.
        key="order_id",
        one_in_flight_per_key=True,
        # Once final, the gateway's ledger must agree with the outcome (a late charge, a
        # refund made outside the saga): checked by the sweeper.
        reconcile=order_ledger,
    )


ORDER_FULFILMENT = register(order_fulfilment())
