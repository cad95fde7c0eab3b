"""The relay: sends the signals that committed transitions owe and that no process sent.

A transition whose events have a receiver writes a `SagaNotice` in its transaction; the
process that committed it sends the signals right after the commit and deletes the notice
(`notify.committed`). A notice still there `SAGAS_RELAY_AFTER` seconds later was never sent,
or its deletion failed: its process died between the COMMIT and its callbacks, or never heard
the COMMIT's answer. The relay, run by the sweeper's task, sends it: at least once, and never
for a change that rolled back, which wrote no notice.

Notices are claimed in a short transaction of their own (`SKIP LOCKED`, and their time set to
now, so that another relay leaves them alone for `SAGAS_RELAY_AFTER`); the signals are sent
outside it, as the committing process sends them; then each notice is deleted. A relay that
dies after sending and before deleting sends them again later. Receivers get the event's id
(`event_id`) to make themselves idempotent.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.db.models.functions import Now

from .. import signals
from ..models import Saga, SagaEvent, SagaNotice
from . import notify

logger = logging.getLogger("sagas")


def relay(*, older_than: timedelta, batch_size: int = 100) -> int:
    """Send the notices written more than `older_than` ago and still there; returns how many
    were sent. Safe to run concurrently."""
    return _send(_claim(SagaNotice.objects.filter(created_at__lt=Now() - older_than), batch_size))


def relay_saga(saga_id: Any) -> int:
    """Send the saga's unsent notices now, whatever their age: a delivery that lost its
    database connection may have committed a transition unheard (`after_unsure_commit`). A
    notice its own process is sending at this moment is sent twice."""
    return _send(_claim(SagaNotice.objects.filter(saga_id=saga_id), batch_size=100))


def _claim(notices: Any, batch_size: int) -> list[SagaNotice]:
    with transaction.atomic():
        claimed = list(notices.select_for_update(skip_locked=True).order_by("id")[:batch_size])
        if claimed:
            SagaNotice.objects.filter(pk__in=[n.pk for n in claimed]).update(created_at=Now())
    return claimed


def _send(notices: list[SagaNotice]) -> int:
    """Send each notice's signals and delete it; returns how many were sent. A notice none of
    whose signals has a receiver in this process is kept, for a process that has one (and
    said: receivers belong in every process)."""
    sent = 0
    for notice in notices:
        saga = Saga.objects.filter(pk=notice.saga_id).first()
        events = list(
            SagaEvent.objects.filter(
                saga_id=notice.saga_id,
                id__gte=notice.first_event_id,
                id__lte=notice.last_event_id,
                kind__in=list(signals.BY_KIND),
            ).order_by("id")
        )
        if saga is not None and events and not notify.signalled(events):
            logger.error(
                "saga %s: signals %s of a committed transition have no receiver in this "
                "process; connect receivers in every process (AppConfig.ready). Kept for "
                "the next sweep",
                saga.pk,
                ", ".join(sorted({e.kind for e in events})),
            )
            continue
        if saga is not None and events:
            logger.warning(
                "saga %s: %d signal(s) its transition owed were never sent: sent now",
                saga.pk,
                len(events),
            )
            signals.announce(saga, events, [e.pk for e in events])
        notify.sent(notice.pk)
        sent += 1
    return sent
