"""Admin for orders and their lines (read-only: orders change through the saga)."""

from __future__ import annotations

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from orders.admin_links import fulfilment_links
from orders.models import Order, OrderLine
from sagas.admin import ReadOnlyAdminMixin, sagas_of_object


class OrderLineInline(ReadOnlyAdminMixin, admin.TabularInline):
    model = OrderLine
    extra = 0
    can_delete = False
    fields = ("sku", "quantity", "unit_price", "line_total")
    readonly_fields = fields


@admin.register(Order)
class OrderAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("id", "customer", "status", "total", "currency", "saga_link", "created_at")
    list_filter = ("status", "currency", "created_at")
    search_fields = ("id", "customer__username", "customer__email", "lines__sku")
    list_select_related = ("customer", "saga")
    date_hierarchy = "created_at"
    fields = (
        "id",
        "customer",
        "status",
        "total",
        "currency",
        "shipping_address",
        "saga_link",
        "sagas",
        "fulfilment",
        "created_at",
        "updated_at",
    )
    readonly_fields = ("saga_link", "sagas", "fulfilment")
    inlines = (OrderLineInline,)
    # Every saga whose key is this order's id (the order fulfilment saga's key).
    sagas = sagas_of_object(description="sagas of this order")

    @admin.display(description="saga", ordering="saga__status")
    def saga_link(self, order: Order) -> SafeString | str:
        if order.saga is None:
            return "-"
        url = reverse("admin:sagas_saga_change", args=[order.saga.pk])
        return format_html('<a href="{}">{}</a>', url, order.saga.get_status_display())

    @admin.display(description="payment, stock and shipment")
    def fulfilment(self, order: Order) -> SafeString | str:
        links = fulfilment_links(order.pk, order.saga_id)
        if not links:
            return "-"
        rows = ((url, label) for label, url in links)
        return format_html_join(" · ", '<a href="{}">{}</a>', rows)
