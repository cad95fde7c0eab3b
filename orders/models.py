"""Orders and their lines."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q


class OrderStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    CONFIRMED = "confirmed", "Confirmed"
    CANCELLED = "cancelled", "Cancelled"


class Order(models.Model):
    # Chosen when the order is submitted and carried in the saga's input, so that every step
    # can name the order before (and whether or not) this row exists.
    id = models.UUIDField(
        primary_key=True, default=uuid.uuid4, editable=False, help_text="The order's id."
    )
    customer = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="orders",
        help_text="The customer who placed the order; empty for a guest.",
    )
    status = models.CharField(
        max_length=20,
        choices=OrderStatus.choices,
        default=OrderStatus.PENDING,
        help_text="Pending while it is being fulfilled; then confirmed or cancelled.",
    )
    currency = models.CharField(max_length=3, help_text="ISO 4217 currency code.")
    total = models.DecimalField(
        max_digits=12, decimal_places=2, help_text="Sum of the line totals."
    )
    shipping_address = models.JSONField(
        help_text="Name, line1, city, postal_code and country (ISO 3166-1 alpha-2)."
    )
    saga = models.OneToOneField(
        "sagas.Saga",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="order",
        help_text="The order fulfilment saga of this order.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the order was created.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change to the order.")

    class Meta:
        verbose_name = "order"
        verbose_name_plural = "orders"
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=OrderStatus.values), name="order_status_valid"
            ),
            models.CheckConstraint(condition=Q(total__gte=0), name="order_total_not_negative"),
        ]
        indexes = [
            models.Index(fields=["status", "created_at"], name="order_status_created_idx"),
            models.Index(fields=["-created_at"], name="order_created_idx"),
        ]

    def __str__(self) -> str:
        return f"Order {self.id} ({self.status})"


class OrderLine(models.Model):
    order = models.ForeignKey(
        Order, on_delete=models.CASCADE, related_name="lines", help_text="The order."
    )
    sku = models.CharField("SKU", max_length=64, help_text="The product's stock keeping unit.")
    quantity = models.PositiveIntegerField(help_text="Units ordered.")
    unit_price = models.DecimalField(
        max_digits=12, decimal_places=2, help_text="Price of one unit when the order was placed."
    )
    line_total = models.DecimalField(
        max_digits=12, decimal_places=2, help_text="Quantity times unit price."
    )

    class Meta:
        verbose_name = "order line"
        verbose_name_plural = "order lines"
        ordering = ("order", "pk")
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gte=1), name="order_line_quantity_min"),
            models.CheckConstraint(
                condition=Q(unit_price__gte=0), name="order_line_unit_price_not_negative"
            ),
            models.UniqueConstraint(fields=["order", "sku"], name="order_line_unique_sku"),
        ]

    def __str__(self) -> str:
        return f"{self.quantity} x {self.sku}"
