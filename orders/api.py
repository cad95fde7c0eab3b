"""The REST API of orders: submit an order, and follow it with its payment, stock and shipment.

An order is submitted here but its row is created by the first step of its saga, so until that
step has run the order is shown from the saga's input, as pending.
"""

from __future__ import annotations

import io
import re
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Prefetch, QuerySet
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.reverse import reverse
from rest_framework.throttling import BaseThrottle

from inventory.models import Reservation
from inventory.selectors import product_prices
from orders.models import Order, OrderLine, OrderStatus
from orders.services import ORDER_FULFILMENT_SAGA, OrderInvalid, order_submit
from payments.models import Payment
from sagas.api import DetailSerializer, Pagination, SagaSummarySerializer, ScopedThrottle
from sagas.models import Saga, SagaStatus
from sagas.parsers import BoundedJSONParser
from shipping.models import Shipment

# Documented limits of a submission (also in the OpenAPI schema).
MAX_LINES = 50
MAX_QUANTITY = 100
MAX_IDEMPOTENCY_KEY_LENGTH = 100
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}")
CENT = Decimal("0.01")


class RequestTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self) -> None:
        super().__init__(f"The request body is larger than {settings.ORDERS_MAX_BODY_BYTES} bytes.")


def _check_body_size(request: Request) -> None:
    """Refuse a declared oversized body before reading any of it."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > settings.ORDERS_MAX_BODY_BYTES:
        raise RequestTooLarge()


class LimitedJSONParser(BoundedJSONParser):
    """Bounded JSON that reads at most `ORDERS_MAX_BODY_BYTES`, whatever the Content-Length said."""

    def parse(self, stream: Any, media_type: Any = None, parser_context: Any = None) -> Any:
        limit = settings.ORDERS_MAX_BODY_BYTES
        body = stream.read(limit + 1)
        if len(body) > limit:
            raise RequestTooLarge()
        return super().parse(io.BytesIO(body), media_type, parser_context)


# -- input ----------------------------------------------------------------------------------------


class StrictCharField(serializers.CharField):
    """A JSON string, and only a string: 12 or true is not a SKU."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which no database column can hold
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer, and only an integer: "2", 2.0 and true are refused."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so that a misspelt or unsupported one is not ignored."""

    def to_internal_value(self, data: Any) -> Any:
        unknown = sorted(set(data) - set(self.fields)) if isinstance(data, Mapping) else []
        errors = {str(name)[:64]: ["Unknown field."] for name in unknown[:10]}
        try:
            value = super().to_internal_value(data)
        except ValidationError as exc:
            if errors and isinstance(exc.detail, dict):
                exc.detail.update(ValidationError(errors).detail)  # type: ignore[arg-type]
            raise
        if errors:
            raise ValidationError(errors)
        return value


class StrictSerializerSchema(OpenApiSerializerExtension):
    """Says in the schema what `StrictSerializer` enforces: no properties but the declared."""

    target_class = StrictSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        return {**schema, "additionalProperties": False}


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
        known = product_prices(skus={item["sku"] for item in items})
        seen: set[str] = set()
        # Keyed by the item's position, as DRF reports the items' own field errors.
        errors: dict[int, dict[str, list[str]]] = {}
        for position, item in enumerate(items):
            sku = item["sku"]
            if sku not in known:
                errors[position] = {"sku": ["Unknown SKU."]}
            elif sku in seen:
                errors[position] = {"sku": ["Listed twice: give each SKU once, with its quantity."]}
            seen.add(sku)
        if errors:
            raise ValidationError(errors)
        return items


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not IDEMPOTENCY_KEY_PATTERN.fullmatch(key):
        raise ValidationError(
            {
                "Idempotency-Key": [
                    f"1 to {MAX_IDEMPOTENCY_KEY_LENGTH} printable ASCII characters, no spaces."
                ]
            }
        )
    return key


# -- output ---------------------------------------------------------------------------------------


@dataclass
class OrderView:
    """An order with what its saga did for it: the payment, the reservations, the shipment."""

    order: Order
    lines: list[OrderLine]
    payment: Payment | None = None
    reservations: list[Reservation] = field(default_factory=list)
    shipment: Shipment | None = None

    @property
    def pk(self) -> uuid.UUID:
        return self.order.pk


class OrderLineSerializer(serializers.ModelSerializer):
    class Meta:
        model = OrderLine
        fields = ["sku", "quantity", "unit_price", "line_total"]
        read_only_fields = fields


class PaymentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Payment
        fields = ["status", "amount", "refunded_amount", "currency"]
        read_only_fields = fields


class ReservationSerializer(serializers.ModelSerializer):
    sku = serializers.CharField(source="product.sku", read_only=True, help_text="The product.")

    class Meta:
        model = Reservation
        fields = ["sku", "quantity", "status"]
        read_only_fields = fields


class ShipmentSerializer(serializers.ModelSerializer):
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


def _line_total(quantity: int, unit_price: Decimal) -> Decimal:
    return (unit_price * quantity).quantize(CENT)


def _order_from_saga(saga: Saga) -> OrderView:
    """The order as submitted, before (or without) its row: the saga's first step makes it."""
    data = saga.input
    # The row never comes if the saga was rolled back before its first step completed.
    rolled_back = saga.status == SagaStatus.COMPENSATED
    order = Order(
        id=data["order_id"],
        customer_id=data.get("customer_id"),
        status=OrderStatus.CANCELLED if rolled_back else OrderStatus.PENDING,
        currency=data["currency"],
        total=Decimal(data["total"]),
        shipping_address=data["shipping_address"],
        saga=saga,
    )
    order.created_at = saga.created_at
    lines = [
        OrderLine(
            sku=item["sku"],
            quantity=item["quantity"],
            unit_price=Decimal(item["unit_price"]),
            line_total=_line_total(item["quantity"], Decimal(item["unit_price"])),
        )
        for item in data["items"]
    ]
    return OrderView(order=order, lines=lines)


def _with_fulfilment(views: list[OrderView]) -> list[OrderView]:
    """Attach payments, reservations and shipments: one query each, whatever the count."""
    ids = [view.order.pk for view in views]
    payments = {p.order_id: p for p in Payment.objects.filter(order_id__in=ids).order_by("pk")}
    shipments = {s.order_id: s for s in Shipment.objects.filter(order_id__in=ids).order_by("pk")}
    reservations: dict[uuid.UUID, list[Reservation]] = defaultdict(list)
    for reservation in (
        Reservation.objects.filter(order_id__in=ids).select_related("product").order_by("pk")
    ):
        reservations[reservation.order_id].append(reservation)
    for view in views:
        # The latest payment and shipment of the order win (the dicts keep the last by pk).
        view.payment = payments.get(view.order.pk)
        view.shipment = shipments.get(view.order.pk)
        view.reservations = reservations[view.order.pk]
    return views


def sagas_of_order(order_id: uuid.UUID) -> QuerySet[Saga]:
    """The order fulfilment saga of an order, found by its input (an order has one).

    Unordered, so that PostgreSQL uses orders_saga_order_id_idx: with the default ordering and
    a LIMIT it walks the newest sagas instead.
    """
    return Saga.objects.filter(name=ORDER_FULFILMENT_SAGA, input__order_id=str(order_id)).order_by()


def _views(orders: Iterable[Order]) -> list[OrderView]:
    return [OrderView(order=order, lines=list(order.lines.all())) for order in orders]


ORDER_EXAMPLE = {
    "items": [{"sku": "MUG-CLASSIC", "quantity": 2}],
    "shipping_address": {
        "name": "Ada Lovelace",
        "line1": "12 St James's Square",
        "city": "London",
        "postal_code": "SW1Y 4JH",
        "country": "GB",
    },
    "payment_token": "tok_ok",
}

SUBMIT_DESCRIPTION = f"""Submit an order: it is fulfilled asynchronously by its saga.

Returns 202 with the order (pending) and its saga to follow. With an `Idempotency-Key` header,
submitting again with the same key returns the first order and saga with 200, never a second one
(keys are per user).

Limits: at most {MAX_LINES} lines, each SKU once, quantities 1 to {MAX_QUANTITY}, a body of at
most {settings.ORDERS_MAX_BODY_BYTES} bytes (413 beyond). Submissions are throttled per user
(scope `orders`, `ORDERS_THROTTLE_RATE`, default 60/minute; 429 beyond).
"""


@extend_schema_view(
    list=extend_schema(summary="List orders", description="Staff see every order, others theirs."),
    retrieve=extend_schema(
        summary="An order with its payment, reservations and shipment",
        responses={200: OrderDetailSerializer, 404: DetailSerializer},
    ),
)
class OrderViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    viewsets.GenericViewSet,
):
    """Orders: customers submit and see their own; staff see all."""

    pagination_class = Pagination
    # JSON only (415 otherwise), read up to the size limit (413 beyond).
    parser_classes = [LimitedJSONParser]
    throttle_scope = "orders"
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_throttles(self) -> list[BaseThrottle]:
        if self.action == "create":
            return [ScopedThrottle()]
        return super().get_throttles()

    def get_serializer_class(self) -> type[serializers.BaseSerializer]:
        if self.action == "create":
            return OrderSubmitSerializer
        return OrderSerializer if self.action == "list" else OrderDetailSerializer

    def get_queryset(self) -> QuerySet[Order]:
        orders = Order.objects.select_related("saga").prefetch_related(
            Prefetch("lines", queryset=OrderLine.objects.order_by("pk"))
        )
        user = self.request.user
        return orders if user.is_staff else orders.filter(customer_id=user.pk)

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        page = self.paginate_queryset(self.get_queryset())
        serializer = OrderSerializer(
            _views(page or []), many=True, context=self.get_serializer_context()
        )
        return self.get_paginated_response(serializer.data)

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        try:
            order_id = uuid.UUID(str(kwargs["pk"]))
        except ValueError as exc:
            raise NotFound() from exc
        view = self._view(order_id)
        serializer = OrderDetailSerializer(view, context=self.get_serializer_context())
        return Response(serializer.data)

    def _view(self, order_id: uuid.UUID) -> OrderView:
        order = self.get_queryset().filter(pk=order_id).first()
        if order is not None:
            return _with_fulfilment(_views([order]))[0]
        # Not created yet (or never): the saga that will create it knows the order.
        sagas = sagas_of_order(order_id)
        if not self.request.user.is_staff:
            sagas = sagas.filter(created_by_id=self.request.user.pk)
        saga = next(iter(sagas[:1]), None)
        if saga is None:
            raise NotFound()
        return _order_from_saga(saga)

    @extend_schema(
        summary="Submit an order",
        description=SUBMIT_DESCRIPTION,
        request=OrderSubmitSerializer,
        parameters=[
            OpenApiParameter(
                "Idempotency-Key",
                {"type": "string", "pattern": r"^[!-~]{1,100}$"},
                OpenApiParameter.HEADER,
                description="Resubmitting with the same key returns the first order (200).",
            )
        ],
        examples=[OpenApiExample("An order", value=ORDER_EXAMPLE, request_only=True)],
        responses={
            202: OpenApiResponse(OrderDetailSerializer, description="Accepted: the saga runs."),
            200: OpenApiResponse(OrderDetailSerializer, description="Submitted before (same key)."),
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="Field errors."),
            401: DetailSerializer,
            413: OpenApiResponse(DetailSerializer, description="The body is too large."),
            415: OpenApiResponse(DetailSerializer, description="Not JSON."),
            429: OpenApiResponse(DetailSerializer, description="Throttled."),
        },
    )
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        _check_body_size(request)
        submission = OrderSubmitSerializer(data=request.data)
        submission.is_valid(raise_exception=True)
        key = _idempotency_key(request)
        try:
            saga, created = order_submit(
                customer=request.user, idempotency_key=key, **submission.validated_data
            )
        except OrderInvalid as exc:
            raise ValidationError({"non_field_errors": [str(exc)]}) from exc
        view = self._submitted(saga)
        body = OrderDetailSerializer(view, context=self.get_serializer_context()).data
        return Response(
            body,
            status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
            headers={"Location": reverse("order-detail", args=[view.pk], request=request)},
        )

    def _submitted(self, saga: Saga) -> OrderView:
        order = self.get_queryset().filter(pk=saga.input["order_id"]).first()
        if order is None:
            return _order_from_saga(saga)
        return _with_fulfilment(_views([order]))[0]
