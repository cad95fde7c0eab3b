"""Admin for the catalog and the stock reservations."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode
from uuid import UUID

from django.contrib import admin
from django.db.models import Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from inventory.models import Product, Reservation, ReservationStatus
from sagas.admin import ReadOnlyAdminMixin


def order_link(order_id: UUID) -> SafeString:
    url = reverse("admin:orders_order_change", args=[order_id])
    return format_html('<a href="{}">{}</a>', url, order_id)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("sku", "name", "price", "stock_on_hand", "reserved", "updated_at")
    search_fields = ("sku", "name")
    ordering = ("sku",)
    fields = ("sku", "name", "price", "stock_on_hand", "reservations", "created_at", "updated_at")

    def get_readonly_fields(self, request: HttpRequest, obj: Product | None = None) -> list[str]:
        # Reservations change the stock under a row lock while orders run: a form that saved
        # the number it loaded would undo them. Stock is set when a product is added.
        readonly = ["reservations", "created_at", "updated_at"]
        return readonly if obj is None else ["stock_on_hand", *readonly]

    def save_model(self, request: HttpRequest, obj: Product, form: Any, change: bool) -> None:
        if not change:
            super().save_model(request, obj, form, change)
        elif form.changed_data:
            # Only the edited columns: never the stock, which the form read a moment ago.
            obj.save(update_fields=[*form.changed_data, "updated_at"])

    def get_queryset(self, request: HttpRequest) -> QuerySet[Product]:
        active = Q(reservations__status=ReservationStatus.ACTIVE)
        return (
            super()
            .get_queryset(request)
            .annotate(reserved_units=Coalesce(Sum("reservations__quantity", filter=active), 0))
        )

    @admin.display(description="reserved", ordering="reserved_units")
    def reserved(self, product: Product) -> int:
        """Units held by active reservations (already deducted from the stock on hand)."""
        return getattr(product, "reserved_units", 0)

    @admin.display(description="reservations")
    def reservations(self, product: Product) -> SafeString:
        # A link rather than an inline: a popular product has thousands of reservations.
        query = urlencode({"product__id__exact": product.pk})
        url = f"{reverse('admin:inventory_reservation_changelist')}?{query}"
        return format_html(
            '<a href="{}">{} units reserved, active</a>', url, self.reserved(product)
        )


@admin.register(Reservation)
class ReservationAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Reservations change only through the inventory services: read-only here."""

    list_display = ("order", "product", "quantity", "status", "created_at", "released_at")
    list_filter = ("status", "created_at")
    search_fields = ("order_id", "product__sku")
    list_select_related = ("product",)
    date_hierarchy = "created_at"
    fields = ("order", "product", "quantity", "status", "created_at", "released_at")
    readonly_fields = ("order",)

    @admin.display(description="order", ordering="order_id")
    def order(self, reservation: Reservation) -> SafeString:
        return order_link(reservation.order_id)
