"""Gauges read from the database when scraped: the sagas in flight, the stalled ones, and how
long the one that has waited longest has gone without progress.

One statement, served by saga_in_flight_idx: it reads the sagas in flight only, however many
finished sagas the table keeps.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache

from django.db import connection
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .. import conf
from ..definitions import registered
from ..models import IN_FLIGHT, Saga


@cache
def in_flight_sql() -> str:
    q = connection.ops.quote_name
    return (
        f"SELECT {q('name')}, {q('status')}, count(*), "
        f"count(*) FILTER (WHERE {q('updated_at')} < %s), min({q('updated_at')}) "
        f"FROM {q(Saga._meta.db_table)} WHERE {q('status')} IN (%s, %s, %s) "
        f"GROUP BY {q('name')}, {q('status')}"
    )


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
