"""The web process's `/metrics`: `path("metrics", sagas.metrics.views.metrics)` in your URLconf.

It serves this process's counters (or, with `PROMETHEUS_MULTIPROC_DIR`, those of every process
writing to that directory: gunicorn's workers) and the gauges read from the database. Only
this view reads the database: a worker's server leaves the gauges to it.
"""

from __future__ import annotations

import hmac
import os

from django.http import HttpRequest, HttpResponse
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from .. import conf
from . import instruments
from .database import DatabaseCollector


class _ThisProcess(Collector):
    """prometheus-client's default registry (this process's metrics), as one collector."""

    def collect(self):  # type: ignore[no-untyped-def]
        return REGISTRY.collect()


def registry(*, database: bool) -> CollectorRegistry:
    """What to expose: every process's files in multiprocess mode (as prometheus-client asks,
    in a registry of its own), else this process's metrics; and the database's gauges."""
    exposed = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        MultiProcessCollector(exposed)
    else:
        exposed.register(_ThisProcess())
    if database:
        exposed.register(DatabaseCollector())
    return exposed


def _authorized(request: HttpRequest, token: str) -> bool:
    sent = request.headers.get("Authorization", "")
    return hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())


@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The exposition, in the format the scraper asks for (Prometheus text or OpenMetrics)."""
    token = conf.metrics_token()
    if token and not _authorized(request, token):
        return HttpResponse(status=401, headers={"WWW-Authenticate": "Bearer"})
    instruments.zero_series()
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encode(registry(database=True)), content_type=content_type)
