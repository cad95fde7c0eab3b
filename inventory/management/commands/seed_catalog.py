"""Create or update the demo catalog (idempotent)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from inventory.services import catalog_seed


class Command(BaseCommand):
    help = (
        "Create or update the demo product catalog, resetting each product's stock to its "
        "catalog level. Safe to run again."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        for product, created in catalog_seed():
            verb = "created" if created else "updated"
            self.stdout.write(
                f"{verb:8} {product.sku:12} {product.price:>8} EUR  "
                f"stock {product.stock_on_hand:>4}  {product.name}"
            )
        self.stdout.write(self.style.SUCCESS("Catalog seeded."))
