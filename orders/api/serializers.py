"""The orders API's serializers: a submission, strictly validated, and an order as shown."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers
from rest_framework.exceptions import ValidationError

from inventory.models import Reservation
from orders.models import OrderLine, OrderStatus
from payments.models import Payment
from sagas.api import (
    ModelSerializer,
    SagaSummarySerializer,
    StrictCharField,
    StrictIntegerField,
    StrictSerializer,
)
from shipping.models import Shipment

# Documented limits of a submission (also in the OpenAPI schema).
MAX_LINES = 50
MAX_QUANTITY = 100


# -- input ----------------------------------------------------------------------------------------


class OrderItemSerializer(StrictSerializer):
    """A line of an order."""

    sku = StrictCharField(max_length=64, help_text="The product's SKU, as in /api/products/.")
    quantity = StrictIntegerField(
        min_value=1, max_value=MAX_QUANTITY, help_text=f"Units, 1 to {MAX_QUANTITY}."
    )


class AddressSerializer(StrictSerializer):
    """A shipping address."""

    name = StrictCharField(max_length=200, help_text="The recipient.")
    line1 = StrictCharField(max_length=200, help_text="Street and number.")
    line2 = StrictCharField(max_length=200, required=False, help_text="More of the address.")
    city = StrictCharField(max_length=100)
    postal_code = StrictCharField(max_length=20)
    country = serializers.RegexField(
        r"^[A-Z]{2}\Z",
        help_text="ISO 3166-1 alpha-2 code: two uppercase letters, such as GB.",
        error_messages={"invalid": "Use an ISO 3166-1 alpha-2 code: two uppercase letters."},
    )


class OrderSubmitSerializer(StrictSerializer):
    """An order to submit. Unknown fields are refused."""

    items = serializers.ListField(
        child=OrderItemSerializer(),
        min_length=1,
        max_length=MAX_LINES,
        help_text=f"1 to {MAX_LINES} lines, each SKU at most once.",
    )
    shipping_address = AddressSerializer()
    payment_token = StrictCharField(
        max_length=64, help_text="The payment method's token (tok_ok, tok_declined, ...)."
    )

    def validate_items(self, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # Unknown SKUs are the service's to find (`order_submit`, which reads the prices once),
        # with field errors of the same shape.
        seen: set[str] = set()
        # Keyed by the item's position, as DRF reports the items' own field errors.
        errors: dict[int, dict[str, list[str]]] = {}
        for position, item in enumerate(items):
            sku = item["sku"]
            if sku in seen:
                errors[position] = {"sku": ["Listed twice: give each SKU once, with its quantity."]}
            seen.add(sku)
        if errors:
            raise ValidationError(errors)
        return items


# -- output ---------------------------------------------------------------------------------------


class OrderLineSerializer(ModelSerializer):
    class Meta:
        model = OrderLine
        fields = ["sku", "quantity", "unit_price", "line_total"]
        read_only_fields = fields


class PaymentSerializer(ModelSerializer):
    class Meta:
        model = Payment
        fields = ["status", "amount", "refunded_amount", "currency"]
        read_only_fields = fields


class ReservationSerializer(ModelSerializer):
    sku = serializers.CharField(source="product.sku", read_only=True, help_text="The product.")

    class Meta:
        model = Reservation
        fields = ["sku", "quantity", "status"]
        read_only_fields = fields


class ShipmentSerializer(ModelSerializer):
    class Meta:
        model = Shipment
        fields = ["tracking_number", "status", "country"]
        read_only_fields = fields


class OrderSerializer(serializers.Serializer):
    id = serializers.UUIDField(source="order.id", read_only=True)
    url = serializers.HyperlinkedIdentityField(view_name="order-detail", read_only=True)
    status = serializers.ChoiceField(
        choices=OrderStatus.choices,
        source="order.status",
        read_only=True,
        help_text="Pending while the saga runs; then confirmed or cancelled.",
    )
    total = serializers.DecimalField(
        max_digits=12, decimal_places=2, source="order.total", read_only=True
    )
    currency = serializers.CharField(source="order.currency", read_only=True)
    created_at = serializers.DateTimeField(source="order.created_at", read_only=True)
    lines = OrderLineSerializer(many=True, read_only=True)
    saga = SagaSummarySerializer(
        source="order.saga", read_only=True, allow_null=True, help_text="The fulfilment saga."
    )


class OrderDetailSerializer(OrderSerializer):
    shipping_address = AddressSerializer(source="order.shipping_address", read_only=True)
    payment = PaymentSerializer(read_only=True, allow_null=True)
    reservations = ReservationSerializer(many=True, read_only=True)
    shipment = ShipmentSerializer(read_only=True, allow_null=True)
