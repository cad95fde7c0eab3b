"""A Celery worker's metrics: prometheus-client's multiprocess mode for the prefork pool.

A worker's steps run in its pool's child processes, each with its own memory. With
`PROMETHEUS_MULTIPROC_DIR` set in the worker's environment (by its start-up script: the
children inherit it), each child writes its metrics to a file of its own there, and the
worker's main process serves them all, added up, on `SAGAS_METRICS_WORKER_PORT`: a registry
with a `MultiProcessCollector`, served by `prometheus_client.start_http_server`, as
prometheus-client's guide to multiprocess mode has it. A child that exits is marked dead
(`mark_process_dead`, on Celery's `worker_process_shutdown`): its counters stay counted, its
live gauges go. The directory must be emptied before the worker starts (systemd's
`RuntimeDirectory=` does; so does `make run`).

A metrics server that cannot start (its port taken) is logged and does not stop the worker:
metrics are not worth a saga.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery.signals import worker_init, worker_process_shutdown
from prometheus_client import start_http_server
from prometheus_client.multiprocess import mark_process_dead

from .. import conf
from . import instruments
from .views import registry

logger = logging.getLogger("sagas")


def connect() -> None:
    worker_init.connect(serve, weak=False, dispatch_uid="sagas.metrics.serve")
    worker_process_shutdown.connect(
        process_gone, weak=False, dispatch_uid="sagas.metrics.process_gone"
    )


def serve(**kwargs: Any) -> None:
    """In the worker's main process, before its pool starts: serve `/metrics`, with every
    definition's series created at 0 (in the main process's own file)."""
    port = conf.metrics_worker_port()
    if port is None:
        return
    instruments.zero_series()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning(
            "sagas metrics: PROMETHEUS_MULTIPROC_DIR is not set, so the worker's pool "
            "processes keep their metrics to themselves; the server on port %s shows none",
            port,
        )
    address = conf.metrics_worker_address()
    try:
        start_http_server(port, addr=address, registry=registry(database=False))
    except OSError as exc:
        logger.warning("sagas metrics: cannot serve on %s:%s (%s)", address, port, exc)
        return
    logger.info("sagas metrics: serving this worker's metrics on %s:%s/metrics", address, port)


def process_gone(pid: int | None = None, **kwargs: Any) -> None:
    """In a pool process that exits: its live gauges leave the directory."""
    if pid and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        mark_process_dead(pid)
