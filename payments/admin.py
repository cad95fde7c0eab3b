"""Admin for payments and the simulated gateway's ledger (all read-only)."""

from __future__ import annotations

from urllib.parse import urlencode
from uuid import UUID

from django.contrib import admin
from django.urls import reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString

from payments.models import GatewayAttempt, GatewayCharge, GatewayOutage, Payment
from sagas.admin import ReadOnlyAdminMixin


def order_link(order_id: UUID) -> SafeString:
    url = reverse("admin:orders_order_change", args=[order_id])
    return format_html('<a href="{}">{}</a>', url, order_id)


@admin.register(Payment)
class PaymentAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = (
        "order",
        "amount",
        "currency",
        "status",
        "refunded_amount",
        "saga_link",
        "created_at",
    )
    list_filter = ("status", "currency", "created_at")
    search_fields = ("order_id", "gateway_charge_id")
    list_select_related = ("saga",)
    date_hierarchy = "created_at"
    fields = (
        "order",
        "saga",
        "amount",
        "currency",
        "status",
        "refunded_amount",
        "gateway_charge",
        "created_at",
        "updated_at",
    )
    readonly_fields = ("order", "gateway_charge")

    @admin.display(description="order", ordering="order_id")
    def order(self, payment: Payment) -> SafeString:
        return order_link(payment.order_id)

    @admin.display(description="saga", ordering="saga__status")
    def saga_link(self, payment: Payment) -> SafeString | str:
        if payment.saga is None:
            return "-"
        url = reverse("admin:sagas_saga_change", args=[payment.saga.pk])
        return format_html('<a href="{}">{}</a>', url, payment.saga.get_status_display())

    @admin.display(description="gateway charge")
    def gateway_charge(self, payment: Payment) -> SafeString:
        query = urlencode({"q": payment.gateway_charge_id})
        url = f"{reverse('admin:payments_gatewaycharge_changelist')}?{query}"
        return format_html('<a href="{}">{}</a>', url, payment.gateway_charge_id)


@admin.register(GatewayCharge)
class GatewayChargeAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("charge_id", "amount", "currency", "status", "decline_code", "created_at")
    list_filter = ("status", "decline_code", "token")
    search_fields = ("charge_id", "idempotency_key")
    date_hierarchy = "created_at"


@admin.register(GatewayAttempt)
class GatewayAttemptAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("idempotency_key", "operation", "token", "outcome", "created_at")
    list_filter = ("operation", "outcome", "token")
    search_fields = ("idempotency_key",)
    date_hierarchy = "created_at"


@admin.register(GatewayOutage)
class GatewayOutageAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    list_display = ("created_at", "active")
