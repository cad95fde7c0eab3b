"""Admin links between an order, its saga, payment, reservations and shipment.

`saga_links` is named by the `SAGAS_ADMIN_LINKS` setting: the `sagas` app calls it for a saga's
page without importing the domain apps. A saga's input names its order; the order row exists
once the saga's first step ran.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlencode

from django.urls import reverse

from inventory.models import Reservation
from orders.models import Order
from payments.models import GatewayCharge, Payment
from sagas.models import Saga
from shipping.models import Shipment

CHARGE_STEP = "charge_payment"


def _changelist(name: str, **query: str) -> str:
    return f"{reverse(f'admin:{name}_changelist')}?{urlencode(query)}"


def fulfilment_links(order_id: uuid.UUID, saga_id: uuid.UUID | None) -> list[tuple[str, str]]:
    """(label, admin url) pairs for the payment, ledger, reservations and shipment of an order."""
    links: list[tuple[str, str]] = []
    for payment in Payment.objects.filter(order_id=order_id):
        label = f"Payment {payment.amount} {payment.currency} ({payment.get_status_display()})"
        links.append((label, reverse("admin:payments_payment_change", args=[payment.pk])))
    charge_key = f"{saga_id}:{CHARGE_STEP}"
    if saga_id is not None and GatewayCharge.objects.filter(idempotency_key=charge_key).exists():
        links.append(("Gateway ledger", _changelist("payments_gatewaycharge", q=charge_key)))
    reservations = Reservation.objects.filter(order_id=order_id).count()
    if reservations:
        label = f"Reservations ({reservations})"
        links.append((label, _changelist("inventory_reservation", order_id=str(order_id))))
    for shipment in Shipment.objects.filter(order_id=order_id):
        label = f"Shipment {shipment.tracking_number} ({shipment.get_status_display()})"
        links.append((label, reverse("admin:shipping_shipment_change", args=[shipment.pk])))
    return links


def saga_links(saga: Saga) -> list[tuple[str, str]]:
    """(label, admin url) pairs for the domain objects of an order fulfilment saga."""
    try:
        order_id = uuid.UUID(str((saga.input or {}).get("order_id")))
    except ValueError:
        return []
    links: list[tuple[str, str]] = []
    order = Order.objects.filter(pk=order_id).first()
    if order is not None:
        label = f"Order {order.total} {order.currency} ({order.get_status_display()})"
        links.append((label, reverse("admin:orders_order_change", args=[order.pk])))
    return links + fulfilment_links(order_id, saga.pk)
