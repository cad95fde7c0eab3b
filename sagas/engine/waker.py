"""The wake: end the waits whose timeout is due, and apply the signals kept while their saga was
busy, within seconds of their time (the `sagas.wake` task, which beat sends every few seconds).

The sweep does the same, at its own pace, as a safety net (`sagas.engine.sweeper`). A wake with
nothing to do costs one query, on the partial indexes of the waiting stages and of the kept
signals (`due`). Otherwise it works in batches (`waits.apply_kept`, `time_out_due`: each saga
under its lock, a saga that another transaction holds skipped and left for the next wake),
and goes on while a batch was full, for `max_seconds` at most: a wake never holds a worker
process for long, and the next one goes on where it stopped. Several wakes at once are safe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime

from django.db import connection, transaction
from django.db.models import Exists, OuterRef
from django.db.models.fields.json import KT
from django.utils import timezone

from ..models import Saga, SagaSignal, SagaStep, SignalStatus, StepStatus, stage_definition
from . import waits
from .unit import lock

logger = logging.getLogger("sagas")

# Sagas a batch takes: one saga's timeout is a few milliseconds.
BATCH_SIZE = 200
# Timeouts one transaction ends, each in a savepoint of its own: one commit (one flush of the
# write-ahead log, half of a timeout's time) for them all. Their sagas stay locked until it
# commits, some 0.1 s: a signal meanwhile waits for it.
PER_TRANSACTION = 25
# A wake takes no new batch after this many seconds: thousands of waits falling due at once
# are ended by several wakes in a row, each of them short.
MAX_SECONDS = 5.0


@dataclass
class WakeReport:
    waits_timed_out: list[str] = field(default_factory=list)
    signals_applied: int = 0
    batches: int = 0


def due(now: datetime) -> tuple[bool, bool]:
    """Whether some kept signal is for the wait its saga waits at (`waits.apply_kept` applies
    it), and whether some wait's timeout is due: one query, each half from a partial index
    (`saga_signal_kept_idx`, then each such signal's stage rows; `saga_step_due_at_idx`), so a
    wake with nothing to do reads next to nothing. A signal kept for a wait still to come (sent
    early) is not counted: the wait consumes it when it begins."""
    waiting_for_it = (
        SagaStep.objects.filter(saga_id=OuterRef("saga_id"), status=StepStatus.WAITING)
        .alias(stage_definition=stage_definition())
        .annotate(waited_for=KT("stage_definition__event"))
        .filter(waited_for=OuterRef("event"))
    )
    kept = SagaSignal.objects.filter(Exists(waiting_for_it), status=SignalStatus.KEPT)
    timed = SagaStep.objects.filter(status=StepStatus.WAITING, due_at__lte=now)
    kept_sql, kept_params = kept.values("pk").query.sql_with_params()
    timed_sql, timed_params = timed.values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT EXISTS ({kept_sql}), EXISTS ({timed_sql})", [*kept_params, *timed_params]
        )
        signals, timeouts = cursor.fetchone()
    return bool(signals), bool(timeouts)


def time_out_due(*, batch_size: int = BATCH_SIZE) -> list[str]:
    """End the waits whose timeout is due (`waits.timed_out`), the earliest first, each under
    its saga's lock; a saga that another transaction holds is skipped, for the next wake.
    `PER_TRANSACTION` of them commit together. Returns the sagas'."""
    batch = waits.due_waits(timezone.now(), batch_size)
    ended = []
    for first in range(0, len(batch), PER_TRANSACTION):
        with transaction.atomic():
            for saga_id, index in batch[first : first + PER_TRANSACTION]:
                # A savepoint: the engine commits its own transaction with its write, and
                # leaves one it is nested in to its owner.
                with transaction.atomic():
                    claimed = Saga.objects.select_for_update(skip_locked=True).filter(pk=saga_id)
                    if not claimed.values_list("pk", flat=True):
                        continue
                    unit = lock(saga_id)
                    if waits.timed_out(unit, index):
                        unit.save()
                        ended.append(str(saga_id))
    return ended


def wake(*, batch_size: int = BATCH_SIZE, max_seconds: float = MAX_SECONDS) -> WakeReport:
    """Apply the kept signals a waiting saga can take (first: one that came before its wait's
    timeout wins over it), then end the waits whose timeout is due; again while a batch was
    full, for `max_seconds` at most. Safe to run concurrently."""
    started = time.monotonic()
    report = WakeReport()
    while True:
        signals, timeouts = due(timezone.now())
        if not (signals or timeouts):
            break
        applied = waits.apply_kept(batch_size=batch_size) if signals else 0
        ended = time_out_due(batch_size=batch_size) if timeouts else []
        report.signals_applied += applied
        report.waits_timed_out += ended
        report.batches += 1
        # A batch that was not full took all there was, but for the sagas another transaction
        # held (skipped): the next wake tries them again.
        full = applied == batch_size or len(ended) == batch_size
        if not full or time.monotonic() - started >= max_seconds:
            break
    if report.waits_timed_out or report.signals_applied:
        logger.info(
            "wake: %d wait(s) timed out, %d kept signal(s) applied, in %.3f s",
            len(report.waits_timed_out),
            report.signals_applied,
            time.monotonic() - started,
        )
    return report
