"""Admin for shipments (read-only: they change through the shipping services)."""

from __future__ import annotations

from uuid import UUID

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from sagas.admin import ReadOnlyAdminMixin
from shipping.models import Shipment


def order_link(order_id: UUID) -> SafeString:
    url = reverse("admin:orders_order_change", args=[order_id])
    return format_html('<a href="{}">{}</a>', url, order_id)


@admin.register(Shipment)
class ShipmentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("tracking_number", "order", "country", "status", "created_at")
    list_filter = ("status", "country", "created_at")
    search_fields = ("tracking_number", "order_id")
    date_hierarchy = "created_at"
    fields = (
        "tracking_number",
        "order",
        "country",
        "address",
        "status",
        "created_at",
        "updated_at",
        "cancelled_at",
    )
    readonly_fields = ("order",)

    @admin.display(description="order", ordering="order_id")
    def order(self, shipment: Shipment) -> SafeString:
        return order_link(shipment.order_id)
