"""The order stages of the order fulfilment saga: create the order, cancel it, confirm it; and
whether it waits for an operator's review."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from orders.services import order_cancel, order_confirm, order_create
from sagas.definitions import StepContext


def create_order(ctx: StepContext) -> dict[str, str]:
    order = order_create(
        order_id=ctx.input["order_id"],
        saga_id=ctx.saga_id,
        customer_id=ctx.input["customer_id"],
        currency=ctx.input["currency"],
        items=ctx.input["items"],
        shipping_address=ctx.input["shipping_address"],
    )
    return {"order_id": str(order.pk), "total": str(order.total)}


def cancel_order(ctx: StepContext) -> None:
    order_cancel(order_id=ctx.input["order_id"])


def confirm_order(ctx: StepContext) -> None:
    """The saga's completion hook: every step succeeded."""
    order_confirm(order_id=ctx.input["order_id"])


def shipment_input(ctx: StepContext) -> dict[str, Any]:
    """The shipment saga's input (`ORDERS_SHIP_AS_CHILD`): the order and where it goes."""
    return {"order_id": ctx.input["order_id"], "shipping_address": ctx.input["shipping_address"]}


def order_needs_review(ctx: StepContext) -> bool:
    """The condition of the review: the order's total is above the threshold it was submitted
    under (`ORDERS_REVIEW_ABOVE`, in the saga's input; none: no review)."""
    threshold = ctx.input.get("review_above")
    return threshold is not None and Decimal(ctx.input["total"]) > Decimal(threshold)
