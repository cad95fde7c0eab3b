"""Reads of orders: an order with what its saga did for it, also before its row exists.

An order is submitted through the API but its row is created by the first step of its saga, so
until that step has run the order is read from the saga's input, as pending.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal

from django.db.models import QuerySet

from inventory.models import Reservation
from orders.models import Order, OrderLine, OrderStatus
from orders.services import ORDER_FULFILMENT_SAGA, order_price
from payments.models import Payment
from sagas.models import Saga, SagaStatus
from shipping.models import Shipment


@dataclass
class OrderView:
    """An order with what its saga did for it: the payment, the reservations, the shipment."""

    order: Order
    lines: list[OrderLine]
    payment: Payment | None = None
    reservations: list[Reservation] = field(default_factory=list)
    shipment: Shipment | None = None

    @property
    def pk(self) -> uuid.UUID:
        return self.order.pk


def order_from_saga(saga: Saga) -> OrderView:
    """The order as submitted, before (or without) its row: the saga's first step makes it."""
    data = saga.input
    # The row never comes if the saga was rolled back before its first step completed.
    rolled_back = saga.status == SagaStatus.COMPENSATED
    order = Order(
        id=data["order_id"],
        customer_id=data.get("customer_id"),
        status=OrderStatus.CANCELLED if rolled_back else OrderStatus.PENDING,
        currency=data["currency"],
        total=Decimal(data["total"]),
        shipping_address=data["shipping_address"],
        saga=saga,
    )
    order.created_at = saga.created_at
    return OrderView(order=order, lines=order_price(items=data["items"]).lines)


def order_views_with_fulfilment(views: list[OrderView]) -> list[OrderView]:
    """Attach payments, reservations and shipments: one query each, whatever the count."""
    ids = [view.order.pk for view in views]
    payments = {p.order_id: p for p in Payment.objects.filter(order_id__in=ids).order_by("pk")}
    shipments = {s.order_id: s for s in Shipment.objects.filter(order_id__in=ids).order_by("pk")}
    reservations: dict[uuid.UUID, list[Reservation]] = defaultdict(list)
    for reservation in (
        Reservation.objects.filter(order_id__in=ids).select_related("product").order_by("pk")
    ):
        reservations[reservation.order_id].append(reservation)
    for view in views:
        # The latest payment and shipment of the order win (the dicts keep the last by pk).
        view.payment = payments.get(view.order.pk)
        view.shipment = shipments.get(view.order.pk)
        view.reservations = reservations[view.order.pk]
    return views


def sagas_of_order(order_id: uuid.UUID) -> QuerySet[Saga]:
    """The order fulfilment saga of an order, found by its key (the definition's
    `key="order_id"`: an order has one saga).

    Unordered, so that PostgreSQL uses saga_business_key_idx: with the default ordering and a
    LIMIT it walks the newest sagas instead.
    """
    return Saga.objects.filter(name=ORDER_FULFILMENT_SAGA, business_key=str(order_id)).order_by()


def order_views(orders: Iterable[Order]) -> list[OrderView]:
    """Orders with their lines (prefetched by the caller), without fulfilment yet."""
    return [OrderView(order=order, lines=list(order.lines.all())) for order in orders]
