"""The product catalog with its stock, and the stock reserved for orders."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class Product(models.Model):
    sku = models.CharField(
        "SKU", max_length=64, unique=True, help_text="Stock keeping unit: the product's code."
    )
    name = models.CharField(max_length=200, help_text="Name shown to customers.")
    price = models.DecimalField(
        max_digits=12, decimal_places=2, help_text="Unit price, in the shop's currency."
    )
    stock_on_hand = models.PositiveIntegerField(
        default=0, help_text="Units available to reserve; reserved units are already deducted."
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the product was added.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change to the product.")

    class Meta:
        verbose_name = "product"
        verbose_name_plural = "products"
        ordering = ("sku",)
        constraints = [
            # PositiveIntegerField's own check is not named; this one states the invariant.
            models.CheckConstraint(
                condition=Q(stock_on_hand__gte=0), name="product_stock_not_negative"
            ),
            models.CheckConstraint(condition=Q(price__gte=0), name="product_price_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.sku} ({self.name})"


class ReservationStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    RELEASED = "released", "Released"


class Reservation(models.Model):
    order_id = models.UUIDField(help_text="The order the stock is reserved for.")
    product = models.ForeignKey(
        Product,
        on_delete=models.PROTECT,
        related_name="reservations",
        help_text="The product reserved.",
    )
    quantity = models.PositiveIntegerField(help_text="Units reserved.")
    status = models.CharField(
        max_length=20,
        choices=ReservationStatus.choices,
        default=ReservationStatus.ACTIVE,
        help_text="Active while the stock is held for the order; released when returned.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the stock was reserved.")
    released_at = models.DateTimeField(
        null=True, blank=True, help_text="When the stock was returned, if it was."
    )

    class Meta:
        verbose_name = "reservation"
        verbose_name_plural = "reservations"
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=ReservationStatus.values), name="reservation_status_valid"
            ),
            models.CheckConstraint(condition=Q(quantity__gte=1), name="reservation_quantity_min"),
            models.CheckConstraint(
                condition=(
                    Q(status=ReservationStatus.ACTIVE, released_at__isnull=True)
                    | Q(status=ReservationStatus.RELEASED, released_at__isnull=False)
                ),
                name="reservation_released_at_iff_released",
            ),
            # Holding the same product twice for one order would count its stock twice.
            models.UniqueConstraint(
                fields=["order_id", "product"],
                condition=Q(status=ReservationStatus.ACTIVE),
                name="reservation_one_active_per_line",
            ),
        ]
        indexes = [
            models.Index(fields=["order_id"], name="reservation_order_idx"),
            models.Index(fields=["status"], name="reservation_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.product.sku} for {self.order_id} ({self.status})"
