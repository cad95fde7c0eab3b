"""Waits, observed: the signals `saga_waiting` and `saga_resumed`, the metrics of waits and
signals, and a wait's span in its saga's trace.

Real workers run the steps (`saga_db`); a wait's start, end or signal is told in the process
that commits it, and so heard here when it commits here: a saga whose first stage is a wait
begins it here (right after its start), a signal sent from here ends its wait here, and the
sweeper runs here, as beat would run it. What a worker commits is counted by the worker
(scraped from its metrics server).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.utils import timezone
from prometheus_client import REGISTRY

from sagas import services, signals, tracing
from sagas.engine import sweeper
from sagas.engine.relay import relay
from sagas.models import EventKind, Saga, SagaEvent, SagaNotice, SagaStep
from tests.conftest import wait_final, wait_for
from tests.test_bulk import locked_elsewhere
from tests.test_metrics import _scrape_or_none, parse, scrape, value
from tests.test_signals import Died

pytestmark = pytest.mark.django_db(transaction=True)

CONFIRMED = {"reference": "3ds-1"}
NAMES = ("saga_waiting", "saga_resumed")


def start(name: str = "waits_for_payment", order: str = "o-1") -> Saga:
    saga, _ = services.saga_start(name=name, input={"order": order})
    return saga


def waiting(saga: Saga) -> bool:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk) == "waiting"


def wait_until_waiting(saga: Saga) -> SagaStep:
    wait_for(lambda: waiting(saga), timeout=20, what="the saga to wait")
    return SagaStep.objects.get(saga=saga, status="waiting")


def time_out(saga: Saga) -> None:
    """The sweeps, as beat runs them, until one ended the saga's wait at its timeout."""

    def timed_out() -> bool:
        sweeper.sweep(stale_after=timedelta(minutes=1))
        return SagaEvent.objects.filter(saga=saga, kind=EventKind.WAIT_TIMED_OUT).exists()

    wait_for(timed_out, timeout=10, what="the wait's timeout")


def event_of(saga: Saga, kind: str) -> SagaEvent:
    return SagaEvent.objects.get(saga=saga, kind=kind)


# -- signals ------------------------------------------------------------------------------------


@pytest.fixture
def received() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """The waits' signals received in this process, with whether a transaction was still open
    and the saga's status as the database had it."""
    got: list[tuple[str, dict[str, Any]]] = []

    def receiver(name: str):
        def receive(sender, **kwargs):
            assert sender is Saga
            status = Saga.objects.values_list("status", flat=True).get(pk=kwargs["saga_id"])
            got.append(
                (name, {**kwargs, "in_transaction": connection.in_atomic_block, "db": status})
            )

        return receive

    receivers = {name: receiver(name) for name in NAMES}
    for name, receive in receivers.items():
        getattr(signals, name).connect(receive)
    yield got
    for name, receive in receivers.items():
        getattr(signals, name).disconnect(receive)


def heard(received, saga: Saga) -> list[tuple[str, dict[str, Any]]]:
    return [(name, kwargs) for name, kwargs in received if kwargs["saga_id"] == saga.pk]


def test_a_timer_is_announced_as_it_begins_and_as_its_timeout_ends_it(saga_db, received):
    saga = start("cools_off")  # its first stage is a wait: begun here, once the start commits
    wait = wait_until_waiting(saga)
    [(name, began)] = heard(received, saga)
    assert name == "saga_waiting"
    assert began["event_id"] == event_of(saga, EventKind.WAIT_STARTED).pk
    assert (began["definition"], began["stage"], began["index"]) == ("cools_off", "cooling_off", 0)
    assert began["event"] is None  # a timer
    assert began["until"] == wait.due_at
    assert (began["in_transaction"], began["db"]) == (False, "waiting")

    time_out(saga)
    name, ended = heard(received, saga)[1]
    timed_out = event_of(saga, EventKind.WAIT_TIMED_OUT)
    assert name == "saga_resumed"
    assert ended["event_id"] == timed_out.pk
    assert (ended["stage"], ended["index"], ended["how"]) == ("cooling_off", 0, "timeout")
    assert (ended["goes_on"], ended["error_code"], ended["signal_id"]) == (True, "", None)
    row = SagaStep.objects.get(pk=wait.pk)
    assert ended["waited"] == timed_out.detail["duration_ms"] / 1000
    assert ended["waited"] == pytest.approx(
        (row.finished_at - row.started_at).total_seconds(), abs=0.002
    )
    assert ended["waited"] >= 1  # its timeout
    assert wait_final(saga.pk).status == "completed"  # the worker ran the step after it


def test_how_a_wait_ended_is_announced_with_what_the_saga_does_next(saga_db, received):
    confirmed, failed, late = start(order="o-s"), start(order="o-f"), start("waits_briefly", "o-t")
    for saga in (confirmed, failed, late):
        wait_until_waiting(saga)  # begun by a worker, and told there

    outcome = services.saga_signal(
        saga_id=confirmed.pk, event="payment_confirmed", payload=CONFIRMED
    )
    refusal = {"code": "3ds_failed", "message": "3-D Secure failed."}
    failure = services.saga_signal(saga_id=failed.pk, event="payment_confirmed", fail=refusal)
    time_out(late)

    by_saga = {saga.pk: heard(received, saga) for saga in (confirmed, failed, late)}
    assert [name for saga in by_saga.values() for name, _ in saga] == ["saga_resumed"] * 3
    signalled, refused, timed_out = (kwargs for [(_, kwargs)] in by_saga.values())
    assert (signalled["how"], signalled["goes_on"], signalled["error_code"]) == ("signal", True, "")
    assert (signalled["stage"], signalled["index"]) == ("confirmation", 1)
    assert signalled["signal_id"] == outcome.signal_id
    assert signalled["waited"] > 0
    assert (refused["how"], refused["goes_on"], refused["error_code"]) == (
        "failed",
        False,
        "3ds_failed",
    )
    assert refused["signal_id"] == failure.signal_id
    assert refused["db"] in ("compensating", "compensated")
    assert (timed_out["how"], timed_out["goes_on"], timed_out["error_code"]) == (
        "timeout",
        False,
        "wait_timed_out",
    )
    assert timed_out["waited"] >= 1
    assert wait_final(confirmed.pk).status == "completed"
    assert wait_final(failed.pk).status == wait_final(late.pk).status == "compensated"


def test_an_approvals_decision_is_announced_as_how_its_wait_ended(saga_db, received):
    approved, rejected = start("needs_approval", "o-yes"), start("needs_approval", "o-no")
    for saga in (approved, rejected):
        wait_until_waiting(saga)
    services.saga_approve(saga_id=approved.pk, actor="ada")
    services.saga_reject(saga_id=rejected.pk, actor="ada", note="Too big.")

    [(_, yes)] = heard(received, approved)
    [(_, no)] = heard(received, rejected)
    assert (yes["stage"], yes["how"], yes["goes_on"], yes["error_code"]) == (
        "review",
        "approved",
        True,
        "",
    )
    assert (no["how"], no["goes_on"], no["error_code"]) == (
        "rejected",
        False,
        "approval_rejected",
    )
    assert wait_final(approved.pk).status == "completed"
    assert wait_final(rejected.pk).status == "compensated"


def test_saga_resumed_is_sent_by_the_relay_when_its_process_died_first(saga_db, received):
    """As every signal of `sagas.signals`: at least once, with the event's id."""
    saga = start(order="o-relay")
    wait_until_waiting(saga)
    calls = []

    def dies_once(sender, event_id, **kwargs):
        calls.append(event_id)
        if len(calls) == 1:
            raise Died

    signals.saga_resumed.connect(dies_once)
    try:
        with pytest.raises(Died):
            services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
        assert SagaNotice.objects.filter(saga=saga).count() == 1
        assert relay(older_than=timedelta(0)) == 1
    finally:
        signals.saga_resumed.disconnect(dies_once)
    completed = event_of(saga, EventKind.WAIT_COMPLETED)
    assert calls == [completed.pk, completed.pk]
    assert [(name, kwargs["event_id"]) for name, kwargs in heard(received, saga)] == [
        ("saga_resumed", completed.pk)
    ] * 2
    assert not SagaNotice.objects.filter(saga=saga).exists()
    assert wait_final(saga.pk).status == "completed"  # its chain was sent before it died


# -- metrics ------------------------------------------------------------------------------------


def here(name: str, **labels: str) -> float:
    """A metric counted in this process (which sends the signals and runs the sweeps)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def signal_counts(definition: str) -> dict[str, float]:
    return {
        kind: here(f"sagas_signals_{kind}_total", definition=definition)
        for kind in ("received", "consumed", "refused", "discarded")
    }


def grew(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {kind: after[kind] - before[kind] for kind in before}


def test_waits_and_signals_are_counted_where_they_commit(saga_db, worker_metrics):
    url = worker_metrics["url"]
    labels = {"definition": "waits_for_payment", "step": "confirmation"}
    scraped = wait_for(lambda: _scrape_or_none(url), timeout=30, what="the worker's metrics")
    started = value(scraped, "sagas_waits_started_total", **labels)
    signalled = signal_counts("waits_for_payment")
    waited = here("sagas_wait_duration_seconds_count", **labels)

    saga = start(order="o-counted")
    wait_until_waiting(saga)
    # The worker that completed the step before the wait began it, and counted it.
    wait_for(
        lambda: value(scrape(url), "sagas_waits_started_total", **labels) == started + 1,
        timeout=10,
        what="the worker to count the wait",
    )
    services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert wait_final(saga.pk).status == "completed"
    late = services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    assert late.status == "refused"

    counts = grew(signalled, signal_counts("waits_for_payment"))
    assert counts == {"received": 2, "consumed": 1, "refused": 1, "discarded": 0}
    assert here("sagas_wait_duration_seconds_count", **labels) == waited + 1
    completed = event_of(saga, EventKind.WAIT_COMPLETED)
    assert completed.detail["duration_ms"] > 0  # on the timeline too


def test_signals_decided_while_the_saga_was_busy_are_counted_once(saga_db):
    """Kept while a step held the saga (no event then), consumed by the sweep later; refused
    while held (no event ever): each received once, consumed or refused once."""
    paused = start("waits_briefly_then_pauses", "o-busy-refused")
    wait_until_waiting(paused)
    pause_label = {"definition": "waits_briefly_then_pauses", "step": "confirmation"}
    pauses = here("sagas_waits_timed_out_total", **pause_label, action="pause")
    refused_before = signal_counts("waits_briefly_then_pauses")
    time_out(paused)
    assert here("sagas_waits_timed_out_total", **pause_label, action="pause") == pauses + 1
    with locked_elsewhere(paused):
        refused = services.saga_signal(
            saga_id=paused.pk, event="payment_confirmed", payload=CONFIRMED
        )
    assert refused.status == "refused"
    assert grew(refused_before, signal_counts("waits_briefly_then_pauses")) == {
        "received": 1,
        "consumed": 0,
        "refused": 1,
        "discarded": 0,
    }

    kept_saga = start(order="o-busy-kept")
    wait_until_waiting(kept_saga)
    kept_before = signal_counts("waits_for_payment")
    with locked_elsewhere(kept_saga):
        kept = services.saga_signal(
            saga_id=kept_saga.pk, event="payment_confirmed", payload=CONFIRMED
        )
    assert kept.status == "kept"
    assert grew(kept_before, signal_counts("waits_for_payment"))["received"] == 1
    assert sweeper.sweep(stale_after=timedelta(minutes=1)).signals_applied == 1
    assert wait_final(kept_saga.pk).status == "completed"
    assert grew(kept_before, signal_counts("waits_for_payment")) == {
        "received": 1,
        "consumed": 1,
        "refused": 0,
        "discarded": 0,
    }


def test_timeouts_are_counted_by_what_the_saga_did_and_timed(saga_db):
    compensated = {"definition": "waits_briefly", "step": "confirmation"}
    continued = {"definition": "cools_off", "step": "cooling_off"}
    before = {
        "compensate": here("sagas_waits_timed_out_total", **compensated, action="compensate"),
        "continue": here("sagas_waits_timed_out_total", **continued, action="continue"),
        "timed": here("sagas_wait_duration_seconds_count", **continued),
        "seconds": here("sagas_wait_duration_seconds_sum", **continued),
        "within_5s": here("sagas_wait_duration_seconds_bucket", **continued, le="5.0"),
    }
    late, timer = start("waits_briefly", "o-late"), start("cools_off")
    wait_until_waiting(late)
    wait_until_waiting(timer)
    time_out(late)
    time_out(timer)

    assert here("sagas_waits_timed_out_total", **compensated, action="compensate") == (
        before["compensate"] + 1
    )
    assert here("sagas_waits_timed_out_total", **continued, action="continue") == (
        before["continue"] + 1
    )
    assert here("sagas_wait_duration_seconds_count", **continued) == before["timed"] + 1
    waited = event_of(timer, EventKind.WAIT_TIMED_OUT).detail["duration_ms"] / 1000
    assert here("sagas_wait_duration_seconds_sum", **continued) == pytest.approx(
        before["seconds"] + waited
    )
    assert waited >= 1
    assert here("sagas_wait_duration_seconds_bucket", **continued, le="5.0") == (
        before["within_5s"] + (waited <= 5)
    )
    assert wait_final(late.pk).status == "compensated"
    assert wait_final(timer.pk).status == "completed"


def test_the_web_view_reads_the_waiting_sagas_from_the_database(saga_db, client):
    sagas = [start(order=f"o-gauge-{i}") for i in range(3)]
    waits = [wait_until_waiting(saga) for saga in sagas]
    now = timezone.now()
    oldest, overdue, _ = waits
    SagaStep.objects.filter(pk=oldest.pk).update(started_at=now - timedelta(hours=2))
    SagaStep.objects.filter(pk=overdue.pk).update(due_at=now - timedelta(minutes=1))

    samples = parse(client.get("/metrics").content.decode())
    assert value(samples, "sagas_waiting", definition="waits_for_payment") == 3
    assert value(samples, "sagas_waits_overdue", definition="waits_for_payment") == 1
    age = value(samples, "sagas_oldest_wait_age_seconds", definition="waits_for_payment")
    assert 7200 <= age < 7200 + 60
    # A definition with a wait and nothing waiting reads 0, not "no data".
    assert ("sagas_waiting", (("definition", "cools_off"),)) in samples
    assert value(samples, "sagas_waiting", definition="cools_off") == 0
    assert ("sagas_waiting", (("definition", "three_steps"),)) not in samples  # no wait

    services.saga_compensate(saga_id=sagas[0].pk, actor="operator")  # its wait ends
    samples = parse(client.get("/metrics").content.decode())
    assert value(samples, "sagas_waiting", definition="waits_for_payment") == 2
    for saga in sagas[1:]:
        services.saga_signal(saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED)
    for saga in sagas:
        wait_final(saga.pk)


@pytest.mark.django_db
def test_the_waiting_gauges_read_the_waits_through_their_partial_indexes():
    """One statement that reads the waiting sagas (saga_in_flight_idx) and their stage rows
    (by the saga), not the tables' history: cheap with many finished sagas, and linear in the
    waiting ones."""
    from sagas.metrics.database import waiting_parameters, waiting_sql

    finished = Saga.objects.bulk_create(
        Saga(name="history", status="completed", input={}) for _ in range(3000)
    )
    steps = [
        SagaStep(saga=saga, index=i, name=f"s{i}", status="completed", definition={})
        for saga in finished
        for i in range(3)
    ]
    waiting_sagas = Saga.objects.bulk_create(
        Saga(name="waits_for_payment", status="waiting", input={}) for _ in range(20)
    )
    steps += [
        SagaStep(saga=saga, index=0, name="confirmation", status="waiting", definition={})
        for saga in waiting_sagas
    ]
    SagaStep.objects.bulk_create(steps)
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_saga")
        cursor.execute("ANALYZE sagas_sagastep")
        cursor.execute("EXPLAIN " + waiting_sql(), waiting_parameters(timezone.now()))
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "saga_in_flight_idx" in plan and "Seq Scan" not in plan, plan


# -- traces -------------------------------------------------------------------------------------


@pytest.fixture
def spans():
    """Traces on in this process, to the in-memory exporter of tests/test_tracing.py."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from tests.test_tracing import EXPORTER

    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    EXPORTER.clear()
    tracing.install()
    yield EXPORTER
    tracing.uninstall()


def nanoseconds(moment) -> int:
    return int(moment.timestamp() * 1e9)


def test_a_wait_is_a_span_of_its_saga_from_its_start_to_its_end(saga_db, spans):
    from opentelemetry import trace
    from opentelemetry.trace import StatusCode

    saga = start(order="o-traced")  # its span begins here; a worker runs the step
    wait_until_waiting(saga)
    with trace.get_tracer("tests").start_as_current_span("webhook request") as request:
        outcome = services.saga_signal(
            saga_id=saga.pk, event="payment_confirmed", payload=CONFIRMED
        )
    late = start("waits_briefly", "o-traced-late")
    wait_until_waiting(late)
    time_out(late)

    finished = spans.get_finished_spans()
    roots = {s.attributes["sagas.saga.id"]: s for s in finished if s.name.startswith("saga ")}
    waits = {s.attributes["sagas.saga.id"]: s for s in finished if s.name.startswith("wait ")}
    assert set(waits) == {str(saga.pk), str(late.pk)}
    span, root = waits[str(saga.pk)], roots[str(saga.pk)]
    assert span.name == "wait confirmation"
    assert span.context.trace_id == root.context.trace_id
    assert span.parent.span_id == root.context.span_id
    row = SagaStep.objects.get(saga=saga, name="confirmation")
    ended = event_of(saga, EventKind.WAIT_COMPLETED)
    # From the time the saga began waiting, in a worker, to the time the signal ended it here
    # (when its end was recorded: a moment after the wait's row took its finish time).
    assert span.end_time == nanoseconds(ended.created_at)
    assert span.end_time - span.start_time == ended.detail["duration_ms"] * 1_000_000
    recording = nanoseconds(ended.created_at) - nanoseconds(row.finished_at)
    assert 0 <= span.start_time - nanoseconds(row.started_at) <= recording + 1_000_000
    assert span.attributes["sagas.outcome"] == "signal"
    assert span.attributes["sagas.signal.id"] == outcome.signal_id
    assert span.attributes["sagas.step.index"] == 1
    assert span.status.status_code == StatusCode.UNSET
    [link] = span.links  # the request the signal came in, another trace
    assert link.context.span_id == request.get_span_context().span_id

    timed_out = waits[str(late.pk)]
    assert timed_out.parent.span_id == roots[str(late.pk)].context.span_id
    assert timed_out.attributes["sagas.outcome"] == "timeout"
    assert timed_out.attributes["sagas.wait.on_timeout"] == "compensate"
    assert timed_out.status.status_code == StatusCode.ERROR
    assert timed_out.attributes["sagas.error.code"] == "wait_timed_out"
    assert (timed_out.end_time - timed_out.start_time) / 1e9 >= 1
    assert wait_final(saga.pk).status == "completed"
    assert wait_final(late.pk).status == "compensated"
