"""Shipments scheduled with the carrier for orders."""

from __future__ import annotations

from django.db import models
from django.db.models import Q


class ShipmentStatus(models.TextChoices):
    SCHEDULED = "scheduled", "Scheduled"
    CANCELLED = "cancelled", "Cancelled"


class Shipment(models.Model):
    order_id = models.UUIDField(help_text="The order being shipped.")
    tracking_number = models.CharField(
        max_length=32, unique=True, help_text="The carrier's tracking number."
    )
    country = models.CharField(
        max_length=2, help_text="ISO 3166-1 alpha-2 code of the destination country."
    )
    address = models.JSONField(help_text="The delivery address, as given with the order.")
    status = models.CharField(
        max_length=20,
        choices=ShipmentStatus.choices,
        default=ShipmentStatus.SCHEDULED,
        help_text="Scheduled with the carrier, or cancelled.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When it was scheduled.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last change to the shipment.")
    cancelled_at = models.DateTimeField(
        null=True, blank=True, help_text="When it was cancelled, if it was."
    )

    class Meta:
        verbose_name = "shipment"
        verbose_name_plural = "shipments"
        ordering = ("-created_at",)
        constraints = [
            models.CheckConstraint(
                condition=Q(status__in=ShipmentStatus.values), name="shipment_status_valid"
            ),
            # A second scheduled shipment would send the goods twice.
            models.UniqueConstraint(
                fields=["order_id"],
                condition=Q(status=ShipmentStatus.SCHEDULED),
                name="shipment_one_scheduled_per_order",
            ),
        ]
        indexes = [
            models.Index(fields=["order_id"], name="shipment_order_idx"),
            models.Index(fields=["status"], name="shipment_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.tracking_number} to {self.country} ({self.status})"
