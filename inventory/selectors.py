"""Reads of the catalog, for other apps and for the admin."""

from __future__ import annotations

from collections.abc import Iterable
from decimal import Decimal

from inventory.models import Product


def product_prices(*, skus: Iterable[str]) -> dict[str, Decimal]:
    """The current unit price of each known SKU; unknown SKUs are simply absent."""
    return dict(Product.objects.filter(sku__in=list(skus)).values_list("sku", "price"))


def product_stock(*, sku: str) -> int | None:
    """Units on hand of one product, or None if there is no such SKU."""
    return Product.objects.filter(sku=sku).values_list("stock_on_hand", flat=True).first()
