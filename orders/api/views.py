"""The orders API's views: submit an order, and follow it with its payment, stock and shipment."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db.models import Prefetch, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiExample,
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import BaseThrottle

from orders.models import Order, OrderLine
from orders.selectors import (
    OrderView,
    order_from_saga,
    order_views,
    order_views_with_fulfilment,
    sagas_of_order,
)
from orders.services import OrderInvalid, order_submit
from sagas.api import DetailSerializer, Pagination, ScopedThrottle
from sagas.api.parsers import idempotency_key
from sagas.models import Saga

from .parsers import LimitedJSONParser, check_body_size
from .serializers import (
    MAX_LINES,
    MAX_QUANTITY,
    OrderDetailSerializer,
    OrderSerializer,
    OrderSubmitSerializer,
)

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
            order_views(page or []), many=True, context=self.get_serializer_context()
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
            return order_views_with_fulfilment(order_views([order]))[0]
        # Not created yet (or never): the saga that will create it knows the order.
        sagas = sagas_of_order(order_id)
        if not self.request.user.is_staff:
            sagas = sagas.filter(created_by_id=self.request.user.pk)
        saga = next(iter(sagas[:1]), None)
        if saga is None:
            raise NotFound()
        return order_from_saga(saga)

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
        check_body_size(request)
        submission = OrderSubmitSerializer(data=request.data)
        submission.is_valid(raise_exception=True)
        key = idempotency_key(request)
        try:
            saga, created = order_submit(
                customer=request.user, idempotency_key=key, **submission.validated_data
            )
        except OrderInvalid as exc:
            raise ValidationError(exc.errors or {"non_field_errors": [str(exc)]}) from exc
        view = self._submitted(saga, created)
        body = OrderDetailSerializer(view, context=self.get_serializer_context()).data
        return Response(
            body,
            status=status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK,
            # The order's, as reversed for the body (a str subclass there: WSGI wants a str).
            headers={"Location": str(body["url"])},
        )

    def _submitted(self, saga: Saga, created: bool) -> OrderView:
        if created:
            # As submitted, pending, without looking for its row: the chain that makes it was
            # sent a moment ago, on commit (a worker quick enough to have begun shows in a GET).
            return order_from_saga(saga)
        order = self.get_queryset().filter(pk=saga.input["order_id"]).first()
        if order is None:
            return order_from_saga(saga)
        return order_views_with_fulfilment(order_views([order]))[0]
