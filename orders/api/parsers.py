"""Limits of an order submission: the body's size, and the Idempotency-Key header (the
framework's `sagas.api.parsers.idempotency_key`)."""

from __future__ import annotations

import io
from typing import Any

from django.conf import settings
from rest_framework import status
from rest_framework.exceptions import APIException
from rest_framework.request import Request

from sagas.api.parsers import BoundedJSONParser


class RequestTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self) -> None:
        super().__init__(f"The request body is larger than {settings.ORDERS_MAX_BODY_BYTES} bytes.")


def check_body_size(request: Request) -> None:
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
