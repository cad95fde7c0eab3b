"""Prometheus metrics of the sagas (`SAGAS_METRICS = True`; the `metrics` extra).

Counters and histograms of what the engine committed (`instruments`), counted in the process
that committed it; gauges of the sagas in flight, read from the database when scraped
(`database`); the `/metrics` view of the web process (`views`); and a worker's server for its
prefork processes, in prometheus-client's multiprocess mode (`worker`).
"""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured


def install() -> None:
    """Count the engine's events, and serve a worker's metrics (`SAGAS_METRICS_WORKER_PORT`)."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImproperlyConfigured(
            "SAGAS_METRICS is on, but prometheus-client is not installed: "
            "pip install 'django-sagas[metrics]'"
        ) from None
    from ..engine import notify
    from . import instruments, worker

    notify.add_observer(instruments.observer)
    worker.connect()
