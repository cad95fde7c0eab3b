"""Gauges read from the database when scraped: the sagas in flight, the stalled ones, and how
long the one that has waited longest has gone without progress; the sagas waiting at a wait,
the overdue ones, and how long the oldest wait has waited.

Two statements, each served by indexes: the sagas in flight by saga_in_flight_idx (partial),
the waits as the waiting sagas (saga_in_flight_idx) each with the stage it waits at (its
current step, by saga_step_unique_index). They read what is in flight or waiting only, however
many finished sagas the tables keep; the second reads each waiting saga's two rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from functools import cache
from typing import Any

from django.db import connection
from django.db.models import Count
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import conf
from ..definitions import SagaDefinition, Wait, registered
from ..models import IN_FLIGHT, Reconciliation, Saga, SagaStatus, SagaStep, StepStatus


@cache
def in_flight_sql() -> str:
    q = connection.ops.quote_name
    return (
        f"SELECT {q('name')}, {q('status')}, count(*), "
        f"count(*) FILTER (WHERE {q('updated_at')} < %s), min({q('updated_at')}) "
        f"FROM {q(Saga._meta.db_table)} WHERE {q('status')} IN (%s, %s, %s) "
        f"GROUP BY {q('name')}, {q('status')}"
    )


@cache
def waiting_sql() -> str:
    q = connection.ops.quote_name
    saga, step = q(Saga._meta.db_table), q(SagaStep._meta.db_table)
    return (
        f"SELECT s.{q('name')}, count(*), min(w.{q('started_at')}), "
        f"count(*) FILTER (WHERE w.{q('due_at')} < %s) "
        f"FROM {saga} s JOIN {step} w "
        f"ON w.{q('saga_id')} = s.{q('id')} AND w.{q('index')} = s.{q('current_step')} "
        f"WHERE w.{q('status')} = %s AND s.{q('status')} = %s "
        f"GROUP BY s.{q('name')}"
    )


def waiting_parameters(now: datetime) -> list[Any]:
    return [now, StepStatus.WAITING, SagaStatus.WAITING]


def _has_a_wait(definition: SagaDefinition) -> bool:
    return any(isinstance(stage, Wait) for stage in definition.steps)


class DatabaseCollector(Collector):
    """The sagas in flight by definition and status, the stalled ones (no progress for
    `SAGAS_RECOVERY_STALE_AFTER`: the sweeper's to take) and the oldest progress's age."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = timezone.now()
        with connection.cursor() as cursor:
            cursor.execute(in_flight_sql(), [now - conf.recovery_stale_after(), *IN_FLIGHT])
            rows = cursor.fetchall()
        in_flight = GaugeMetricFamily(
            "sagas_in_flight",
            "Sagas pending, running or compensating.",
            labels=["definition", "status"],
        )
        stalled = GaugeMetricFamily(
            "sagas_stalled",
            "Sagas in flight with no progress for SAGAS_RECOVERY_STALE_AFTER: the sweeper's.",
            labels=["definition"],
        )
        oldest = GaugeMetricFamily(
            "sagas_oldest_progress_age_seconds",
            "Seconds since the saga in flight that has waited longest made progress.",
            labels=["definition"],
        )
        # Every registered definition has its series, at 0 when nothing is in flight: an idle
        # system reads 0, not "no data" (nor a stale last value).
        names = registered()
        counts = {(name, str(status)): 0 for name in names for status in IN_FLIGHT}
        by_definition: dict[str, tuple[int, float]] = dict.fromkeys(names, (0, 0.0))
        for name, status, count, stale, least_recent in rows:
            counts[(name, status)] = count
            stale_before, age_before = by_definition.get(name, (0, 0.0))
            age = max(age_before, (now - least_recent).total_seconds())
            by_definition[name] = (stale_before + stale, age)
        for (name, status), count in sorted(counts.items()):
            in_flight.add_metric([name, status], count)
        for name, (stale, age) in sorted(by_definition.items()):
            stalled.add_metric([name], stale)
            oldest.add_metric([name], age)
        yield from (in_flight, stalled, oldest)
        yield from self.waits(now)
        yield self.discrepant()

    def discrepant(self) -> GaugeMetricFamily:
        """The final sagas their reconciliation check flagged (`saga_discrepant_idx`)."""
        found = dict(
            Saga.objects.filter(reconciliation=Reconciliation.DISCREPANT)
            .order_by()
            .values_list("name")
            .annotate(count=Count("pk"))
        )
        gauge = GaugeMetricFamily(
            "sagas_discrepant",
            "Final sagas whose last reconciliation check found the outside world disagreeing "
            "with them (flagged until a check agrees again).",
            labels=["definition"],
        )
        checked = [name for name, definition in registered().items() if definition.reconcile]
        for name in sorted({*checked, *found}):
            gauge.add_metric([name], found.get(name, 0))
        return gauge

    def waits(self, now: datetime) -> Iterator[GaugeMetricFamily]:
        """The sagas waiting at a wait, those past their wait's due time that no wake (or
        sweep) ended yet (none for longer than `SAGAS_WAKE_INTERVAL`, unless nothing sends
        `sagas.wake`), and the oldest wait's age."""
        with connection.cursor() as cursor:
            cursor.execute(waiting_sql(), waiting_parameters(now))
            rows = cursor.fetchall()
        waiting = GaugeMetricFamily(
            "sagas_waiting",
            "Sagas waiting at a wait (for an event or a time).",
            labels=["definition"],
        )
        overdue = GaugeMetricFamily(
            "sagas_waits_overdue",
            "Sagas waiting past their wait's timeout, which the next wake (sagas.wake) ends.",
            labels=["definition"],
        )
        oldest = GaugeMetricFamily(
            "sagas_oldest_wait_age_seconds",
            "Seconds since the saga that has waited longest at a wait began waiting.",
            labels=["definition"],
        )
        # At 0 for the registered definitions that have a wait, as above.
        found = {name: (0, 0, 0.0) for name, d in registered().items() if _has_a_wait(d)}
        for name, count, least_recent, late in rows:
            age = (now - least_recent).total_seconds() if least_recent else 0.0
            found[name] = (count, late, age)
        for name, (count, late, age) in sorted(found.items()):
            waiting.add_metric([name], count)
            overdue.add_metric([name], late)
            oldest.add_metric([name], age)
        yield from (waiting, overdue, oldest)
