"""Middleware: a short JSON 503, never a traceback, while the database is unreachable."""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger("sagas")


class DatabaseUnavailableMiddleware:
    """Answer 503 while PostgreSQL is down or restarting, so clients know to retry."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        return database_unavailable_response(request, exception)


def database_unavailable_response(request: HttpRequest, exc: Exception) -> HttpResponse | None:
    """The 503 for a database that cannot be reached; None for any other error.

    Shared by this middleware and the API's exception handler (DRF handles view errors first).
    """
    if not isinstance(exc, OperationalError | InterfaceError):
        return None
    logger.warning("database unavailable while serving %s %s", request.method, request.path)
    return JsonResponse(
        {"detail": "The service is temporarily unavailable. Please retry shortly."},
        status=503,
        headers={"Retry-After": "5"},
    )
