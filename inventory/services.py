"""Stock reservations and the catalog: every change to a product's stock goes through here."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from inventory.models import Product, Reservation, ReservationStatus
from sagas.exceptions import BusinessError


class InventoryErrorCode(StrEnum):
    UNKNOWN_SKU = "unknown_sku"
    INSUFFICIENT_STOCK = "insufficient_stock"
    INVALID_QUANTITY = "invalid_quantity"


class InventoryError(BusinessError):
    """Stock cannot be reserved for this order; the message names the SKUs concerned."""

    code = "inventory_error"


@dataclass(frozen=True)
class CatalogEntry:
    sku: str
    name: str
    price: Decimal
    stock_on_hand: int


# The demo shop. BIKE-CITY is dear enough to exceed the payment gateway's limit in quantity;
# POSTER-LTD is scarce enough to run out.
DEMO_CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("TEE-BLUE", "Organic cotton T-shirt, blue", Decimal("19.90"), 250),
    CatalogEntry("MUG-CLASSIC", "Classic ceramic mug", Decimal("12.50"), 300),
    CatalogEntry("HOODIE-GREY", "Zip hoodie, heather grey", Decimal("54.00"), 120),
    CatalogEntry("CAP-BLACK", "Baseball cap, black", Decimal("22.00"), 150),
    CatalogEntry("BIKE-CITY", "City bike, 7 speeds", Decimal("899.00"), 40),
    CatalogEntry("POSTER-LTD", "Limited-edition art print", Decimal("45.00"), 3),
)


def _lock_products(condition: Q) -> list[Product]:
    """The one place that locks products.

    Always in primary-key order, so that two orders sharing products queue behind each other
    instead of deadlocking.
    """
    return list(Product.objects.select_for_update().filter(condition).order_by("pk"))


def _quantities_by_sku(lines: Iterable[Mapping[str, Any]]) -> Counter[str]:
    quantities: Counter[str] = Counter()
    for line in lines:
        quantity = line["quantity"]
        if not isinstance(quantity, int) or isinstance(quantity, bool) or quantity < 1:
            raise InventoryError(
                f"Invalid quantity for {line['sku']}.", code=InventoryErrorCode.INVALID_QUANTITY
            )
        quantities[str(line["sku"])] += quantity
    return quantities


# Steps call this inside their own transaction: a savepoint would add two round trips
# and buy nothing, since any error fails the whole step. Called alone, it is atomic.
@transaction.atomic(savepoint=False)
def inventory_reserve(
    *, order_id: UUID | str, lines: Iterable[Mapping[str, Any]]
) -> list[Reservation]:
    """Reserve stock for every line of an order, or for none.

    `lines` are mappings with `sku` and `quantity`. Reserving again for an order that holds
    active reservations returns them unchanged.
    """
    requested = _quantities_by_sku(lines)
    products = {product.sku: product for product in _lock_products(Q(sku__in=list(requested)))}
    # Checked under the product locks, so a concurrent duplicate sees the first one's rows. By
    # SKU: the lines of one order may be reserved one at a time (`inventory.steps.reserve_line`).
    existing = list(
        Reservation.objects.filter(
            order_id=order_id, status=ReservationStatus.ACTIVE, product__sku__in=list(requested)
        )
    )
    if existing:
        return existing
    unknown = sorted(set(requested) - set(products))
    if unknown:
        raise InventoryError(
            f"Unknown SKU: {', '.join(unknown)}.", code=InventoryErrorCode.UNKNOWN_SKU
        )
    short = [
        f"{sku} ({quantity} requested, {products[sku].stock_on_hand} available)"
        for sku, quantity in requested.items()
        if products[sku].stock_on_hand < quantity
    ]
    if short:
        raise InventoryError(
            f"Not enough stock: {'; '.join(short)}.", code=InventoryErrorCode.INSUFFICIENT_STOCK
        )
    for sku, quantity in requested.items():
        products[sku].stock_on_hand -= quantity
        products[sku].save(update_fields=["stock_on_hand", "updated_at"])
    return Reservation.objects.bulk_create(
        Reservation(order_id=order_id, product=products[sku], quantity=quantity)
        for sku, quantity in requested.items()
    )


@transaction.atomic(savepoint=False)
def inventory_release(
    *, order_id: UUID | str, skus: Iterable[str] | None = None
) -> list[Reservation]:
    """Return the stock of an order's active reservations (of `skus` only, if given).
    Idempotent: returns what it released."""
    # Only the reservations' rows: products are locked below, in primary-key order.
    active = Reservation.objects.select_for_update(of=("self",)).filter(
        order_id=order_id, status=ReservationStatus.ACTIVE
    )
    if skus is not None:
        active = active.filter(product__sku__in=list(skus))
    reservations = list(active.order_by("pk"))
    if not reservations:
        return []
    product_ids = {reservation.product_id for reservation in reservations}
    products = {product.pk: product for product in _lock_products(Q(pk__in=product_ids))}
    now = timezone.now()
    for reservation in reservations:
        products[reservation.product_id].stock_on_hand += reservation.quantity
        reservation.status = ReservationStatus.RELEASED
        reservation.released_at = now
    for product in products.values():
        product.save(update_fields=["stock_on_hand", "updated_at"])
    Reservation.objects.bulk_update(reservations, ["status", "released_at"])
    return reservations


@transaction.atomic
def product_create(*, sku: str, name: str, price: Decimal, stock_on_hand: int = 0) -> Product:
    product = Product(sku=sku, name=name, price=price, stock_on_hand=stock_on_hand)
    product.full_clean()
    product.save()
    return product


@transaction.atomic
def catalog_seed(*, catalog: Iterable[CatalogEntry] = DEMO_CATALOG) -> list[tuple[Product, bool]]:
    """Create or update the catalog's products, resetting their stock.

    Returns each product with whether it was created.
    """
    return [
        Product.objects.update_or_create(
            sku=entry.sku,
            defaults={
                "name": entry.name,
                "price": entry.price,
                "stock_on_hand": entry.stock_on_hand,
            },
        )
        for entry in catalog
    ]
