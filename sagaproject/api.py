"""The project's REST API: orders and products, the token endpoint, the health check, the schema.

The saga endpoints are the framework's own, `sagas.urls`, under /api/sagas/ (sagaproject.urls).
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import connection
from django.http.response import HttpResponseBase
from django.urls import path
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework import serializers, status
from rest_framework.authtoken.models import Token
from rest_framework.authtoken.serializers import AuthTokenSerializer
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.routers import SimpleRouter
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from inventory.api import ProductViewSet
from orders.api import OrderViewSet
from sagaproject.celery import app as celery_app
from sagaproject.middleware import database_unavailable_response
from sagas.api import DetailSerializer, ScopedThrottle

logger = logging.getLogger("sagaproject.api")

# Seconds the health check waits for the broker.
BROKER_CHECK_TIMEOUT = 1.5


def exception_handler(exc: Exception, context: dict[str, Any]) -> HttpResponseBase | None:
    """DRF's handler; a 503 while the database is unreachable (as the middleware would answer,
    had DRF not caught the error first); a plain JSON 500 for anything else. Never a traceback."""
    response: HttpResponseBase | None = drf_exception_handler(exc, context)
    if response is None and (request := context.get("request")) is not None:
        response = database_unavailable_response(request, exc)
    if response is None:
        view = context.get("view")
        logger.error("Unhandled error in %s", type(view).__name__, exc_info=exc)
        response = Response(
            {"detail": "Internal server error."}, status=status.HTTP_500_INTERNAL_SERVER_ERROR
        )
    return response


class AuthTokenView(APIView):
    """Trade a username and password for the user's API token."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    throttle_classes = [ScopedThrottle]
    throttle_scope = "auth"

    @extend_schema(
        summary="Get an API token",
        description=(
            "Send it as `Authorization: Token <token>`. Throttled per client address "
            "(scope `auth`, `AUTH_THROTTLE_RATE`, default 30/minute)."
        ),
        request=AuthTokenSerializer,
        responses={
            200: inline_serializer("Token", {"token": serializers.CharField()}),
            400: OpenApiResponse(description="Wrong or missing credentials."),
            429: DetailSerializer,
        },
        auth=[],
    )
    def post(self, request: Request) -> Response:
        credentials = AuthTokenSerializer(data=request.data, context={"request": request})
        credentials.is_valid(raise_exception=True)
        token, _ = Token.objects.get_or_create(user=credentials.validated_data["user"])
        return Response({"token": token.key})


def database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception as exc:
        logger.warning("Health check: the database does not answer (%s).", type(exc).__name__)
        return False
    return True


def broker_ok() -> bool:
    options = {
        **(celery_app.conf.broker_transport_options or {}),
        "socket_connect_timeout": BROKER_CHECK_TIMEOUT,
        "socket_timeout": BROKER_CHECK_TIMEOUT,
    }
    try:
        with celery_app.connection_for_write(
            settings.CELERY_BROKER_URL,
            connect_timeout=BROKER_CHECK_TIMEOUT,
            transport_options=options,
        ) as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
    except Exception as exc:
        logger.warning("Health check: the broker does not answer (%s).", type(exc).__name__)
        return False
    return True


class HealthView(APIView):
    """Whether the database and the broker answer. Needs no authentication."""

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]
    renderer_classes = [JSONRenderer]

    @extend_schema(
        summary="Health check",
        responses={
            200: inline_serializer(
                "Health",
                {
                    "database": serializers.CharField(help_text="ok, or unavailable."),
                    "broker": serializers.CharField(help_text="ok, or unavailable."),
                },
            ),
            503: OpenApiResponse(description="The database or the broker does not answer."),
        },
        auth=[],
    )
    def get(self, request: Request) -> Response:
        checks = {"database": database_ok(), "broker": broker_ok()}
        body = {name: "ok" if ok else "unavailable" for name, ok in checks.items()}
        healthy = all(checks.values())
        return Response(
            body, status=status.HTTP_200_OK if healthy else status.HTTP_503_SERVICE_UNAVAILABLE
        )


router = SimpleRouter()
router.register("orders", OrderViewSet, basename="order")
router.register("products", ProductViewSet, basename="product")

urlpatterns = [
    *router.urls,
    path("auth/token/", AuthTokenView.as_view(), name="auth-token"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]
