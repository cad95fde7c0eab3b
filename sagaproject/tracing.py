"""The reference project's OpenTelemetry SDK, with SAGAS_TRACING=1: spans to a file.

A project of yours configures the SDK with the exporter of its tracing backend (OTLP to a
collector, Jaeger, Tempo...). This one has no backend to send to, so each process appends its
spans, one JSON object a line, to `SAGAS_TRACES_FILE` (default `<data dir>/traces.jsonl`):
`grep <saga id>` finds a saga's spans, from the web process and the worker alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor


def _line(span: ReadableSpan) -> str:
    record: dict[str, Any] = json.loads(span.to_json())
    return json.dumps(record, separators=(",", ":")) + "\n"


def configure(path: Path) -> None:
    """Every span this process ends goes to `path` (line-buffered: one write a span)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    output = path.open("a", buffering=1)
    resource = Resource.create({"service.name": "sagaproject"})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        SimpleSpanProcessor(ConsoleSpanExporter(out=output, formatter=_line))
    )
    trace.set_tracer_provider(provider)
