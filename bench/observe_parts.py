"""What signals, metrics and traces add to a step, measured alone: no database, no broker.

A step's attempt (`sagas.engine.step_attempt`) hands its events to `sagas.engine.notify` (one
`step_completed` event for a step that is not the last), opens its attempt's span around the
action when traces are on, and, after the commit, has its events counted and its span ended.
This times those calls, a million times over (`timeit`), in each configuration, and prints
microseconds a step:

    .venv/bin/python -m bench.observe_parts
"""

from __future__ import annotations

import os
import timeit
from types import SimpleNamespace
from typing import Any
from uuid import uuid4

ROUNDS = 200_000


def per_call_us(statement: Any, number: int = ROUNDS) -> float:
    best = min(timeit.repeat(statement, number=number, repeat=5))
    return best / number * 1e6


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    os.environ["SAGAS_METRICS"] = "0"
    os.environ["SAGAS_TRACING"] = "0"
    import django

    django.setup()
    from django.utils import timezone
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

    from sagas import signals, tracing
    from sagas.engine import notify
    from sagas.engine.rows import EventRow
    from sagas.metrics import instruments
    from sagas.models import EventKind

    saga = SimpleNamespace(
        id=uuid4(), name="bench_16", status="running", trace_context="", input={}, error_code=""
    )
    step = SimpleNamespace(name="step_3", index=3, attempts=0, compensation_attempts=0)
    event = EventRow(saga.id, 3, "step_3", EventKind.STEP_COMPLETED, {"duration_ms": 4}, None)
    events = [event]
    event.detail["worker"] = "host:1"
    _ = timezone.now()

    results = {}
    results["nothing on: notify.wanted (the hot path's look)"] = per_call_us(
        lambda: notify.wanted(events)
    )

    def receiver(**kwargs: Any) -> None:
        return None

    for name in signals.__all__:
        getattr(signals, name).connect(receiver, weak=False)
    results["receivers on every signal: notify.wanted"] = per_call_us(lambda: notify.wanted(events))
    for name in signals.__all__:
        getattr(signals, name).disconnect(receiver)

    notify.add_observer(instruments.observer)
    results["metrics: notify.wanted + counting after the commit"] = per_call_us(
        lambda: notify.committed(saga, notify.wanted(events))
    )
    notify.remove_observer(instruments.observer)

    class Discard(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Discard()))
    trace.set_tracer_provider(provider)
    tracing.install()
    tracer = notify.tracer
    assert tracer is not None

    def traced_step() -> None:
        with tracer.attempt(saga, step, compensation=False):
            pass
        notify.committed(saga, notify.wanted(events))

    results["traces (SDK, spans discarded): span open, current, ended"] = per_call_us(
        traced_step, number=ROUNDS // 10
    )
    tracing.uninstall()

    for what, us in results.items():
        print(f"{us:8.2f} µs a step  {what}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
