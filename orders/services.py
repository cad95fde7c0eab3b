"""Submitting orders and moving them through their life cycle."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any
from uuid import UUID

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction

from inventory.selectors import product_prices
from orders.models import Order, OrderLine, OrderStatus
from sagas.models import Saga
from sagas.services import saga_start

ORDER_FULFILMENT_SAGA = "order_fulfilment"
CENT = Decimal("0.01")
ADDRESS_FIELDS = ("name", "line1", "city", "postal_code", "country")
OPTIONAL_ADDRESS_FIELDS = ("line2",)
LONGEST_SKU_SHOWN = 64

# Where an order may go from each status; staying put is always allowed (idempotent calls).
NEXT_STATUSES: dict[str, set[str]] = {
    OrderStatus.PENDING: {OrderStatus.CONFIRMED, OrderStatus.CANCELLED},
    OrderStatus.CONFIRMED: set(),
    OrderStatus.CANCELLED: set(),
}


class OrderInvalid(ValueError):
    """A submitted order cannot be accepted. The message says why and is safe to show; `errors`,
    where given, says it field by field, as the API reports field errors."""

    def __init__(self, message: str, *, errors: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.errors = errors


class OrderStatusConflict(Exception):
    """The order's status does not allow the change asked for."""


@dataclass(frozen=True)
class OrderPrice:
    """An order's lines, each with its total, and the order's total."""

    lines: list[OrderLine]  # not saved, and not yet given their order
    total: Decimal


def order_price(*, items: Iterable[Mapping[str, Any]]) -> OrderPrice:
    """Price an order: a line costs its quantity times its unit price, rounded to the cent, and
    the order the sum of its lines. Every price of an order is computed here.

    `items` carry `sku`, `quantity` and `unit_price` (a Decimal, or a decimal string as in the
    saga's input).
    """
    lines = []
    for item in items:
        unit_price = Decimal(item["unit_price"])
        line_total = (unit_price * item["quantity"]).quantize(CENT)
        lines.append(
            OrderLine(
                sku=item["sku"],
                quantity=item["quantity"],
                unit_price=unit_price,
                line_total=line_total,
            )
        )
    return OrderPrice(lines=lines, total=sum((line.line_total for line in lines), Decimal("0.00")))


def order_review_threshold() -> Decimal | None:
    """`ORDERS_REVIEW_ABOVE`: orders with a larger total wait for an operator's approval before
    shipping; None (unset) for no review."""
    value = getattr(settings, "ORDERS_REVIEW_ABOVE", None)
    if value is None or value == "":
        return None
    try:
        threshold = Decimal(str(value))
    except ArithmeticError:
        threshold = Decimal("NaN")
    if not threshold.is_finite() or threshold < 0:
        raise ImproperlyConfigured(
            f"ORDERS_REVIEW_ABOVE must be an amount, such as 500.00, or unset: {value!r}"
        )
    return threshold


# Steps call this inside their own transaction: a savepoint would add two round trips
# and buy nothing, since any error fails the whole step. Called alone, it is atomic.
@transaction.atomic(savepoint=False)
def order_create(
    *,
    order_id: UUID | str,
    saga_id: UUID | str | None,
    customer_id: int | None,
    currency: str,
    items: Iterable[Mapping[str, Any]],
    shipping_address: Mapping[str, Any],
) -> Order:
    """Create a pending order with its lines; the total is the sum of the lines.

    `items` carry `sku`, `quantity` and `unit_price` (a decimal string). The order id is its
    idempotency key: creating an order that exists returns it unchanged.
    """
    existing = Order.objects.filter(pk=order_id).first()
    if existing is not None:
        return existing
    price = order_price(items=items)
    order = Order.objects.create(
        id=order_id,
        saga_id=saga_id,
        customer_id=customer_id,
        currency=currency,
        total=price.total,
        shipping_address=dict(shipping_address),
    )
    for line in price.lines:
        line.order = order
    OrderLine.objects.bulk_create(price.lines)
    return order


def _order_move(*, order_id: UUID | str, to: OrderStatus) -> Order:
    order = Order.objects.select_for_update().get(pk=order_id)
    if order.status == to:
        return order
    if to not in NEXT_STATUSES[order.status]:
        raise OrderStatusConflict(f"Order {order.pk} is {order.status}: it cannot become {to}.")
    order.status = to
    order.save(update_fields=["status", "updated_at"])
    return order


@transaction.atomic(savepoint=False)
def order_confirm(*, order_id: UUID | str) -> Order:
    """Confirm a pending order. Confirming a confirmed order is a no-op."""
    return _order_move(order_id=order_id, to=OrderStatus.CONFIRMED)


@transaction.atomic(savepoint=False)
def order_cancel(*, order_id: UUID | str) -> Order:
    """Cancel a pending order. Cancelling a cancelled order is a no-op."""
    return _order_move(order_id=order_id, to=OrderStatus.CANCELLED)


def order_submit(
    *,
    customer: AbstractBaseUser | AnonymousUser | None,
    items: list[dict[str, Any]],
    shipping_address: dict[str, Any],
    payment_token: str,
    currency: str = "EUR",
    idempotency_key: str | None = None,
) -> tuple[Saga, bool]:
    """Validate and price an order, and start its fulfilment saga. Returns (saga, created).

    Raises `OrderInvalid` for input that cannot make an order. The order row itself is created
    by the saga's first step. A customer's idempotency key is scoped to that customer, so two
    customers cannot collide on the same key. With `ORDERS_REVIEW_ABOVE` set, the saga's input
    carries it (`review_above`): an order above it waits for an operator's approval before
    shipping.
    """
    if customer is not None and not customer.is_authenticated:
        customer = None
    quantities = _validated_items(items)
    address = _validated_address(shipping_address)
    currency = _validated_currency(currency)
    if not isinstance(payment_token, str) or not payment_token.strip():
        raise OrderInvalid("A payment token is required.")
    prices = product_prices(skus=quantities)
    unknown = {position: sku for position, sku in enumerate(quantities) if sku not in prices}
    if unknown:
        # Keyed by the item's position (one per item: a SKU listed twice was refused above).
        raise OrderInvalid(
            f"Unknown SKU: {', '.join(_shown(sku) for sku in unknown.values())}.",
            errors={"items": {position: {"sku": ["Unknown SKU."]} for position in unknown}},
        )
    lines = [
        {"sku": sku, "quantity": quantity, "unit_price": str(prices[sku])}
        for sku, quantity in quantities.items()
    ]
    total = order_price(items=lines).total
    saga_input = {
        "order_id": str(uuid.uuid4()),
        "customer_id": customer.pk if customer is not None else None,
        "currency": currency,
        "items": lines,
        "shipping_address": address,
        "payment_token": payment_token.strip(),
        "total": str(total),
    }
    threshold = order_review_threshold()
    if threshold is not None:
        # The threshold in force when the order was submitted, which the saga's review reads
        # (orders.steps.order_needs_review), whatever the worker's settings say.
        saga_input["review_above"] = str(threshold)
    scoped_key = (
        f"{customer.pk}:{idempotency_key}" if idempotency_key and customer else idempotency_key
    )
    return saga_start(
        name=ORDER_FULFILMENT_SAGA,
        input=saga_input,
        idempotency_key=scoped_key,
        created_by=customer,
    )


def _shown(sku: str) -> str:
    """A SKU as echoed in a message: the input may be arbitrarily long."""
    return sku if len(sku) <= LONGEST_SKU_SHOWN else f"{sku[:LONGEST_SKU_SHOWN]}..."


def _validated_items(items: Any) -> dict[str, int]:
    """SKU to quantity, in the order given."""
    if not isinstance(items, list | tuple) or not items:
        raise OrderInvalid("An order needs at least one item.")
    quantities: dict[str, int] = {}
    for item in items:
        sku = item.get("sku") if isinstance(item, Mapping) else None
        if not isinstance(sku, str) or not sku.strip():
            raise OrderInvalid("Every item needs a SKU.")
        sku, quantity = sku.strip(), item.get("quantity")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise OrderInvalid(f"The quantity of {_shown(sku)} must be a whole number, at least 1.")
        if sku in quantities:
            raise OrderInvalid(f"{_shown(sku)} is listed twice: give it once, with the quantity.")
        quantities[sku] = quantity
    return quantities


def _validated_address(address: Any) -> dict[str, str]:
    if not isinstance(address, Mapping):
        raise OrderInvalid("A shipping address is required.")
    missing = [
        name
        for name in ADDRESS_FIELDS
        if not isinstance(address.get(name), str) or not address[name].strip()
    ]
    if missing:
        raise OrderInvalid(f"The shipping address needs: {', '.join(missing)}.")
    cleaned = {
        name: address[name].strip()
        for name in (*ADDRESS_FIELDS, *OPTIONAL_ADDRESS_FIELDS)
        if isinstance(address.get(name), str) and address[name].strip()
    }
    cleaned["country"] = cleaned["country"].upper()
    if len(cleaned["country"]) != 2 or not cleaned["country"].isalpha():
        raise OrderInvalid("The country must be a two-letter ISO 3166 code, such as GB.")
    return cleaned


def _validated_currency(currency: Any) -> str:
    if not isinstance(currency, str) or len(currency) != 3 or not currency.isalpha():
        raise OrderInvalid("The currency must be a three-letter ISO 4217 code, such as EUR.")
    return currency.upper()
