"""OpenTelemetry traces (`sagas.tracing`): the tree of a completed and of a compensated saga.

The engine is driven in this process, as a worker drives it (the same task function, its
messages suppressed), because the in-memory exporter that the test reads lives here: a span
is exported by the process that ends it, and the suite's worker processes have exporters of
their own. The context that makes a step's span a child of its saga's travels on the saga's
row, not in this process's memory: the test forgets the current context between the steps.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from sagas import engine, tracing
from sagas.models import Saga
from sagas.services import saga_start
from tests.conftest import lose_messages
from tests.test_signals import compensate, run

pytestmark = pytest.mark.django_db(transaction=True)

EXPORTER = InMemorySpanExporter()


@pytest.fixture
def spans(monkeypatch) -> Iterator[InMemorySpanExporter]:
    """Traces on, to an in-memory exporter; the engine's messages suppressed."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    lose_messages(monkeypatch)
    EXPORTER.clear()
    tracing.install()
    yield EXPORTER
    tracing.uninstall()


def delivered(step) -> str:
    """A step's message delivered in a fresh context, as in another worker process."""
    token = otel_context.attach(otel_context.Context())
    try:
        return step()
    finally:
        otel_context.detach(token)


def tree(spans: InMemorySpanExporter) -> tuple[ReadableSpan, list[ReadableSpan]]:
    """The saga's span, and the rest in the order they ended; all of one trace."""
    finished = list(spans.get_finished_spans())
    (root,) = [s for s in finished if s.name.startswith("saga ")]
    assert {s.context.trace_id for s in finished} == {root.context.trace_id}
    return root, [s for s in finished if s is not root]


def outline(root: ReadableSpan, others: list[ReadableSpan]) -> list[tuple]:
    parents = {root.context.span_id: "saga", **{s.context.span_id: s.name for s in others}}
    return [
        (s.name, parents[s.parent.span_id], s.attributes.get("sagas.outcome"))
        for s in others
        if s.parent is not None
    ]


def test_the_trace_of_a_completed_saga(spans):
    saga, _ = saga_start(name="traced", input={})
    stored = Saga.objects.get(pk=saga.pk).trace_context
    assert delivered(lambda: run(saga.pk, 0)) == "retry"  # the first attempt fails, transiently
    assert delivered(lambda: run(saga.pk, 0)) == "done"
    assert delivered(lambda: run(saga.pk, 1)) == "done"

    root, others = tree(spans)
    assert root.name == "saga traced"
    assert root.parent is None
    assert stored.startswith(f"00-{root.context.trace_id:032x}-{root.context.span_id:016x}-")
    assert root.attributes["sagas.saga.id"] == str(saga.pk)
    assert root.attributes["sagas.saga.definition"] == "traced"
    assert outline(root, others) == [
        ("step flaky", "saga", "retrying"),
        ("step flaky", "saga", "completed"),
        ("inner work", "step inner", None),  # what the action traced nests in its step
        ("step inner", "saga", "completed"),
    ]
    retried, flaky, _, last = others
    assert retried.status.status_code == StatusCode.ERROR
    assert retried.attributes["sagas.error.code"] == "hiccup"
    assert [retried.attributes["sagas.attempt"], flaky.attributes["sagas.attempt"]] == [1, 2]
    assert flaky.attributes["sagas.step.name"] == "flaky"
    assert flaky.attributes["sagas.saga.status"] == "running"
    assert last.attributes["sagas.step.index"] == 1
    assert last.attributes["sagas.saga.status"] == "completed"


def test_the_trace_of_a_compensated_saga(spans):
    saga, _ = saga_start(name="declines_second", input={})
    assert delivered(lambda: run(saga.pk, 0)) == "done"
    assert delivered(lambda: run(saga.pk, 1)) == "fail"
    engine.step_chain_failed(str(saga.pk), Saga.objects.get(pk=saga.pk).epoch)
    assert delivered(lambda: compensate(saga.pk, 0)) == "done"

    root, others = tree(spans)
    assert root.name == "saga declines_second"
    assert outline(root, others) == [
        ("step first", "saga", "completed"),
        ("step second", "saga", "failed"),
        ("compensate first", "saga", "compensated"),
    ]
    _, failed, undone = others
    assert failed.attributes["sagas.error.code"] == "declined"
    assert failed.attributes["sagas.saga.status"] == "compensating"
    assert "Declined." not in str(failed.attributes) and not failed.events  # the code only
    assert undone.attributes["sagas.saga.status"] == "compensated"


def test_a_start_that_rolls_back_exports_no_span(spans):
    from django.db import transaction

    with pytest.raises(ZeroDivisionError), transaction.atomic():
        saga_start(name="three_steps", input={})
        1 / 0  # noqa: B018
    assert spans.get_finished_spans() == ()


def test_a_groups_members_are_spans_of_their_saga_named_by_their_step(spans):
    from tests.factories import ProductFactory

    skus = [ProductFactory(stock_on_hand=5).sku for _ in range(2)]
    saga, _ = saga_start(name="group_map", input={"lines": skus})
    assert delivered(lambda: run(saga.pk, 0)) == "done"  # begins the group (its sends lost)
    for position in (0, 1):
        outcome = delivered(
            lambda p=position: engine.step_attempt(str(saga.pk), 1, epoch=0, member=p).kind
        )
        assert outcome == "done"

    root, others = tree(spans)
    members = [s for s in others if s.name == "step lines.reserve"]
    assert [s.attributes["sagas.member"] for s in members] == skus  # the items' keys
    assert {s.parent.span_id for s in members} == {root.context.span_id}
    assert {s.attributes["sagas.outcome"] for s in members} == {"completed"}


def test_a_child_sagas_trace_names_its_parent(spans):
    from tests.factories import ProductFactory

    skus = {"sku": ProductFactory().sku, "child_sku": ProductFactory().sku}
    saga, _ = saga_start(name="parent_order", input=skus)
    assert delivered(lambda: run(saga.pk, 0)) == "done"  # starts the child

    child = Saga.objects.get(parent=saga)
    (started,) = [s for s in spans.get_finished_spans() if s.name == "saga child_shipping"]
    assert started.attributes["sagas.saga.id"] == str(child.pk)
    assert started.attributes["sagas.saga.parent_id"] == str(saga.pk)
    assert started.attributes["sagas.saga.parent_stage"] == 1
    (parent,) = [s for s in spans.get_finished_spans() if s.name == "saga parent_order"]
    assert started.context.trace_id != parent.context.trace_id  # a trace of its own
