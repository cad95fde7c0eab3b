"""Limits of an order submission: the body's size, and the Idempotency-Key header."""

from __future__ import annotations

import io
import re
from typing import Any

from django.conf import settings
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.request import Request

from sagas.api.parsers import BoundedJSONParser

MAX_IDEMPOTENCY_KEY_LENGTH = 100
IDEMPOTENCY_KEY_PATTERN = re.compile(rf"[\x21-\x7e]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}")


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


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key header, if any; a 400 if it is not a valid key."""
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
