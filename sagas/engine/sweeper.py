"""The recovery sweeper: re-dispatch sagas whose messages were lost, from their rows.

Messages can be lost (a worker SIGKILLed, Redis restarted empty, a crash between a commit and a
publish). A saga that is `pending`, `running` or `compensating` and has made no progress for a
while is claimed with `SELECT ... FOR UPDATE SKIP LOCKED` (a step in progress holds the lock,
and several sweepers never claim the same saga) and its remaining steps, or remaining
compensations, are sent again. Every task checks its row first, so a duplicate is a no-op.
A bulk action that made no progress for as long has its next batch sent again, as harmlessly.
Last, the relay sends the signals that committed transitions owe and no process sent
(`sagas.engine.relay`). It also does what the wake does (`sagas.engine.waker`), should no wake
run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.db.models import DateTimeField, DurationField, ExpressionWrapper, F, QuerySet, Value
from django.db.models.functions import Least, Power
from django.utils import timezone

from .. import conf
from ..bulk import batches
from ..models import IN_FLIGHT, Direction, EventKind, Saga, SagaStatus
from . import notify, reconcile, waker
from .children import finished_children, finished_member_children
from .recovery import GAVE_UP, RECOVERED, deadline_passed, recover
from .relay import relay

logger = logging.getLogger("sagas")


@dataclass
class SweepReport:
    recovered: list[str] = field(default_factory=list)
    dead_lettered: list[str] = field(default_factory=list)
    deadline_compensated: list[str] = field(default_factory=list)
    bulk_actions_resumed: list[int] = field(default_factory=list)
    relayed: int = 0
    waits_timed_out: list[str] = field(default_factory=list)
    signals_applied: int = 0
    children_ended: int = 0
    # Final sagas whose reconciliation check ran (`sagas.engine.reconcile`), and those of them
    # it found discrepant.
    reconciled: int = 0
    discrepant: int = 0


# After k recoveries in a row without progress, the next waits stale_after * 2**k, at most
# this many times stale_after.
MAX_BACKOFF_EXPONENT = 6


def _backed_off(now: datetime, stale_after: timedelta) -> Any:
    """When a saga last made progress, at the latest, to be taken as stalled again: a saga
    sent again k times in a row is left alone 2**k times longer. A saga that only waits in a
    queue longer than `stale_after` is otherwise sent again and again, each new chain queued
    behind the last, which makes the queue longer still."""
    factor = Power(Value(2.0), Least(F("recovery_attempts"), Value(MAX_BACKOFF_EXPONENT)))
    return ExpressionWrapper(
        Value(now, output_field=DateTimeField())
        - Value(stale_after, output_field=DurationField()) * factor,
        output_field=DateTimeField(),
    )


def stale_sagas(now: datetime, stale_after: timedelta) -> QuerySet[Saga, Any]:
    """The ids of the sagas to recover, the longest stalled first, locked (skipping the
    locked ones). Read through saga_in_flight_idx: the sagas in flight, not the history."""
    return (
        Saga.objects.select_for_update(skip_locked=True)
        .filter(status__in=IN_FLIGHT, updated_at__lt=now - stale_after)
        .filter(updated_at__lt=_backed_off(now, stale_after))
        .order_by("updated_at")
        .values_list("pk", flat=True)
    )


def sweep(
    *,
    stale_after: timedelta | None = None,
    max_recoveries: int | None = None,
    batch_size: int = 200,
) -> SweepReport:
    """Recover the sagas that made no progress for `stale_after` (longer for those recovered
    in a row already: see `_backed_off`). Safe to run concurrently."""
    stale_after = stale_after or conf.recovery_stale_after()
    limit = conf.recovery_max_attempts() if max_recoveries is None else max_recoveries
    report = SweepReport()
    now = timezone.now()
    started = time.monotonic()
    with transaction.atomic():
        stale = list(stale_sagas(now, stale_after)[:batch_size])
        for saga_id in stale:
            outcome = recover(saga_id, max_recoveries=limit)
            if outcome == RECOVERED:
                report.recovered.append(str(saga_id))
            elif outcome == GAVE_UP:
                report.dead_lettered.append(str(saga_id))
    with transaction.atomic():
        expired = list(
            Saga.objects.select_for_update(skip_locked=True)
            .filter(
                status__in=[*IN_FLIGHT[:2], SagaStatus.WAITING],
                direction=Direction.FORWARD,
                deadline_at__lt=timezone.now(),
            )
            .exclude(events__kind=EventKind.DEADLINE_PASSED)
            .values_list("pk", flat=True)[:batch_size]
        )
        for saga_id in expired:
            if deadline_passed(saga_id):
                report.deadline_compensated.append(str(saga_id))
    # What the wake (`sagas.wake`, every few seconds) does, should it not run: signals kept
    # while their saga was busy, then the waits whose timeout is due.
    woken = waker.wake(batch_size=batch_size)
    report.signals_applied = woken.signals_applied
    report.waits_timed_out = woken.waits_timed_out
    # Parents still waiting for a child that ended (the message that tells them was lost),
    # at a child stage or at a group's child member.
    report.children_ended = finished_children(batch_size=batch_size)
    report.children_ended += finished_member_children(batch_size=batch_size)
    report.bulk_actions_resumed = batches.resume_stalled(stale_after=stale_after)
    # Final sagas checked against the outside world, in a bounded batch: never at the cost of
    # the rest of the sweep (the relay, below).
    try:
        reconciled = reconcile.sweep()
        report.reconciled, report.discrepant = reconciled.checked, reconciled.discrepant
    except Exception:
        logger.exception("sweep: the reconciliation pass failed; the rest of the sweep goes on")
    report.relayed = relay(older_than=conf.relay_after())
    if stale:
        logger.warning(
            "sweeper: recovered %d saga(s), gave up on %d",
            len(report.recovered),
            len(report.dead_lettered),
        )
    notify.swept(time.monotonic() - started, len(report.recovered), len(report.dead_lettered))
    return report
