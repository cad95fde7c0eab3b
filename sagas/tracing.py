"""OpenTelemetry traces of the sagas (`SAGAS_TRACING = True`; the `tracing` extra).

One trace per saga. Its root is the saga's span, `saga <name>`, which `saga_start` begins (a
child of the current span, such as the request's) and which ends when the start commits. Its
context (a W3C `traceparent`) is stored on the saga's row, and every attempt of a step's
action (`step <name>`) or of a compensation (`compensate <name>`) is its child, in whichever
worker and however much later it runs: a retry, a message sent again by the sweeper, an
operator's retry the next day. The row, not the Celery message, carries the context, because
the engine sends messages again from the rows (a lost message's context would be lost with it).
Where the current span is another trace's (Celery's instrumentation's task span), the attempt's
span links to it.

An attempt's span is current while its action runs, so that the spans the action makes (a
database or HTTP client's instrumentation) nest in it. It ends when the transaction that
records its outcome commits: `completed` or `compensated` with the step, `retrying` or
`failed` (or `compensation_retrying`, `compensation_failed`) with the failure's record. An
attempt whose outcome was never committed (its worker died, its transaction rolled back) is
not exported, and neither is a saga whose start rolled back. OpenTelemetry cannot end a span
in another process than the one that began it, so the saga's span covers its start; the trace
covers the saga's whole life. Errors are recorded as the safe code stored on the rows, never
as exception text or a traceback.

A wait is a span too, `wait <name>`, a child of the saga's from the time the saga began waiting
to the time its signal, its timeout or a failing signal ended it. It is made when the wait ends,
with the start the wait's end recorded (`duration_ms`), since it begins in one process and
ends in another, maybe weeks later; it links to the span current where it ended (the request
that sent the signal, say). A wait ended by the saga turning back (an abort, a deadline) has no
span.

The API only (`opentelemetry-api`): the project configures the SDK and its exporter; without
them the spans cost next to nothing and go nowhere.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from django.core.exceptions import ImproperlyConfigured

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
    from opentelemetry.trace import Link, Span, Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - the extra is missing: install() says so
    trace = None  # type: ignore[assignment]

from . import __version__
from .engine import notify
from .engine.unit import safe_error
from .models import EventKind
from .signals import RESUMED_HOW, resumed_how

K = EventKind
OUTCOME: dict[str, str] = {
    K.STEP_COMPLETED: "completed",
    K.STEP_RETRYING: "retrying",
    K.STEP_FAILED: "failed",
    K.STEP_COMPENSATED: "compensated",
    K.COMPENSATION_RETRYING: "compensation_retrying",
    K.COMPENSATION_FAILED: "compensation_failed",
}
COMPENSATION_KINDS: set[str] = {K.STEP_COMPENSATED, K.COMPENSATION_RETRYING, K.COMPENSATION_FAILED}
# The events that end a wait (its span's outcome: `sagas.signals.resumed_how`).
WAIT_ENDS = RESUMED_HOW
# Spans begun whose outcome is not committed yet. A start or an attempt that rolls back leaves
# its span here, never ended (never exported): the oldest go past this many.
PENDING_MAX = 10_000


class Tracing:
    """The tracer of `sagas.engine.notify` (spans while they run) and an observer (their ends)."""

    kinds: frozenset[str] = frozenset({K.SAGA_STARTED, *OUTCOME, *WAIT_ENDS})

    def __init__(self) -> None:
        self.tracer = trace.get_tracer("sagas", __version__)
        self.propagator = TraceContextTextMapPropagator()
        self.pending: OrderedDict[tuple[str, int | None, bool], Span] = OrderedDict()

    def _keep(self, key: tuple[str, int | None, bool], span: Span) -> None:
        self.pending.pop(key, None)  # an earlier attempt that never recorded its outcome
        self.pending[key] = span
        while len(self.pending) > PENDING_MAX:
            self.pending.popitem(last=False)

    # -- spans while they run ----------------------------------------------------------------

    def begin_saga(self, saga: Any) -> str:
        attributes = {"sagas.saga.id": str(saga.id), "sagas.saga.definition": saga.name}
        if getattr(saga, "parent_id", None) is not None:
            # A child saga: a trace of its own, which names its parent (and its stage).
            attributes["sagas.saga.parent_id"] = str(saga.parent_id)
            attributes["sagas.saga.parent_stage"] = int(saga.parent_stage or 0)
        span = self.tracer.start_span(f"saga {saga.name}", attributes=attributes)
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        self._keep((str(saga.id), None, False), span)
        return carrier.get("traceparent", "")

    def attempt(self, saga: Any, step: Any, *, compensation: bool) -> Attempt:
        return Attempt(self, saga, step, compensation)

    # -- their ends, once committed ------------------------------------------------------

    def committed(self, saga: Any, events: Sequence[notify.Event]) -> None:
        for event in events:
            if event.kind == K.SAGA_STARTED:
                span = self.pending.pop((str(saga.id), None, False), None)
                if span is not None:
                    span.end()
                continue
            if event.kind in WAIT_ENDS:
                self.wait(saga, event)
                continue
            key = (str(saga.id), event.step_index, event.kind in COMPENSATION_KINDS)
            span = self.pending.pop(key, None)
            if span is None:  # an attempt of another process, or killed at its time limit
                continue
            span.set_attribute("sagas.outcome", OUTCOME[event.kind])
            span.set_attribute("sagas.saga.status", saga.status)
            if code := event.detail.get("code"):
                # Also when what failed came after the action (`on_complete`, say).
                span.set_status(Status(StatusCode.ERROR, code))
                span.set_attribute("sagas.error.code", code)
            span.end()

    def wait(self, saga: Any, event: notify.Event) -> None:
        """The span of a wait that ended, from the time it began (`duration_ms` before)."""
        waited = event.detail.get("duration_ms")
        if waited is None:  # it never began waiting
            return
        end = int(event.created_at.timestamp() * 1e9)
        parent, links = self.placed(saga)
        span = self.tracer.start_span(
            f"wait {event.step_name}",
            context=parent,
            links=links,
            start_time=end - int(waited) * 1_000_000,
            attributes={
                "sagas.saga.id": str(saga.id),
                "sagas.saga.definition": saga.name,
                "sagas.step.name": event.step_name,
                "sagas.step.index": event.step_index if event.step_index is not None else -1,
                "sagas.outcome": resumed_how(event.kind, event.detail),
                "sagas.saga.status": saga.status,
            },
        )
        if (signal := event.detail.get("signal")) is not None:
            span.set_attribute("sagas.signal.id", signal)
        if action := event.detail.get("action"):
            span.set_attribute("sagas.wait.on_timeout", action)
        if code := event.detail.get("code"):
            span.set_status(Status(StatusCode.ERROR, code))
            span.set_attribute("sagas.error.code", code)
        span.end(end_time=end)

    def placed(self, saga: Any) -> tuple[Any, list[Link] | None]:
        """Where a span of the saga goes: the context stored on its row (None: the current
        one), and a link to the current span where that is another trace's."""
        current = trace.get_current_span().get_span_context()
        parent = None
        if saga.trace_context:
            parent = self.propagator.extract({"traceparent": saga.trace_context})
        stored = trace.get_current_span(parent).get_span_context() if parent else None
        linked = current.is_valid and stored is not None and current.trace_id != stored.trace_id
        return parent, [Link(current)] if linked else None

    def swept(self, seconds: float, recovered: int, dead_lettered: int) -> None:
        return None

    def signal_received(self, saga: Any, *, refused: bool) -> None:
        return None

    def __repr__(self) -> str:
        return "sagas.tracing"


class Attempt:
    """The span of one attempt, current while its action (or compensation) runs."""

    __slots__ = ("compensation", "saga", "span", "step", "token", "tracing")

    def __init__(self, tracing: Tracing, saga: Any, step: Any, compensation: bool) -> None:
        self.tracing, self.saga, self.step, self.compensation = tracing, saga, step, compensation

    def __enter__(self) -> Span:
        saga, step = self.saga, self.step
        attempts = step.compensation_attempts if self.compensation else step.attempts
        parent, links = self.tracing.placed(saga)
        # A group's member: `<group>.<step>` (the same for every item of a map), its own name
        # (a map's: its item's key) as an attribute.
        name = getattr(step, "label", step.name)
        attributes: dict[str, Any] = {
            "sagas.saga.id": str(saga.id),
            "sagas.saga.definition": saga.name,
            "sagas.step.name": name,
            "sagas.step.index": step.index,
            "sagas.attempt": attempts + 1,
        }
        if hasattr(step, "label"):
            attributes["sagas.member"] = step.name
        self.span = self.tracing.tracer.start_span(
            f"{'compensate' if self.compensation else 'step'} {name}",
            context=parent,
            links=links,
            attributes=attributes,
        )
        self.tracing._keep((str(saga.id), step.index, self.compensation), self.span)
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(self, kind: Any, exc: BaseException | None, traceback: Any) -> None:
        otel_context.detach(self.token)
        if exc is not None:
            # The safe code, as on the rows: an exception's text may hold a secret.
            code = safe_error(exc).code
            self.span.set_status(Status(StatusCode.ERROR, code))
            self.span.set_attribute("sagas.error.code", code)
            self.span.set_attribute("sagas.error.type", type(exc).__name__)


observer: Tracing | None = None


def install() -> None:
    """Trace sagas: `sagas.engine.notify`'s tracer and an observer of its events."""
    global observer
    if trace is None:
        raise ImproperlyConfigured(
            "SAGAS_TRACING is on, but opentelemetry-api is not installed: "
            "pip install 'django-sagas[tracing]'"
        )
    observer = observer or Tracing()
    notify.add_observer(observer)
    notify.tracer = observer


def uninstall() -> None:
    if observer is not None:
        notify.remove_observer(observer)
    notify.tracer = None
