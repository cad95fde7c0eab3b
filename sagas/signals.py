"""Django signals of a saga's life, sent once the transaction that made the change commits.

    from django.dispatch import receiver
    from sagas.signals import saga_compensated

    @receiver(saga_compensated)
    def tell_the_customer(sender, saga_id, definition, error_code, **kwargs):
        ...

Each is sent after the commit of the change, never for a change that rolled back, and at least
once: by the process that committed it (a worker for a step, the web process for a start or an
operator's action), right after the outermost transaction; or, if that process died first or
never heard its COMMIT's answer, by the relay, in the worker that runs the sweeper's task
(`sagas.sweep`), `SAGAS_RELAY_AFTER` seconds later at the earliest. So a receiver may be called
twice for one change: `event_id` (the id of the `SagaEvent` it announces) is the same both
times, for the receiver to make itself idempotent. The arguments are those the event
recorded, but `input`, which is the saga's. Connect receivers in every process (in an
`AppConfig.ready()`): a change whose process has no receiver for its signal writes no notice
for the relay, and the relay keeps a notice until a process with a receiver sends it.

`sender` is the `Saga` model; every signal has `saga_id` (a UUID), `definition` (the saga's
name) and `event_id`; the others are listed with each signal. Receivers get keyword
arguments: take `**kwargs`, so that arguments added later do not break them.

A receiver's exception is logged (logger `sagas`) and not raised, and the signal is not sent
again: the change is committed, and the engine carries on. A receiver that needs a
transaction opens its own; one whose work must be retried sends a Celery task of its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from django.dispatch import Signal
from django.utils.dateparse import parse_datetime

from .models import EventKind, Saga

logger = logging.getLogger("sagas")

__all__ = [
    "saga_compensated",
    "saga_completed",
    "saga_discrepancy_cleared",
    "saga_discrepancy_found",
    "saga_failed",
    "saga_paused",
    "saga_resumed",
    "saga_started",
    "saga_waiting",
    "step_failed",
]

#: A saga was started (`saga_start`). Also: `input`, the saga's input.
saga_started = Signal()
#: Every step completed.
saga_completed = Signal()
#: The compensations of the completed steps ran: the saga is undone. Also: `error_code`, why
#: (the failed step's code, `deadline_passed`, or "" when an operator aborted it).
saga_compensated = Signal()
#: The saga stopped and needs an operator. Also: `reason` (`compensation_failed` or
#: `recovery_exhausted`), `step` (the step whose compensation failed, or None), `error_code`
#: and `error_message`.
saga_failed = Signal()
#: A step failed for good and the saga waits for an operator instead of compensating (its
#: policy says `on_exhausted="pause"`, or the saga passed its pivot). Also: `step`, `reason`,
#: `error_code` and `error_message`.
saga_paused = Signal()
#: A step's action failed for good: a business error, or its retries ran out. Also: `step`
#: (its name), `index`, `attempt`, `exhausted` (True when retries ran out), `error_code` and
#: `error_message` (the safe code and message stored on its row). What the saga does next
#: follows as `saga_paused`, or as `saga_compensated` once its compensations ran.
step_failed = Signal()
#: The saga began waiting at a wait, holding no worker: for its event, its timeout, or both.
#: Also: `stage` (the wait's name), `index`, `event` (the signal it waits for, or None for a
#: timer) and `until` (when it times out, an aware datetime, or None: it waits for its event
#: however long). A wait that begins again (an operator's retry) is announced again.
saga_waiting = Signal()
#: A wait the saga waited at ended. Also: `stage`, `index`, `how` (`"signal"`: its event came;
#: `"timeout"`: its time passed; `"failed"`: a signal failed it; an approval's `"approved"` or
#: `"rejected"`), `goes_on` (True when the saga goes on past the wait: its event came, or its
#: timeout says `continue`; False when it turns back or pauses, which follows as
#: `saga_paused`, or as `saga_compensated` once compensated), `waited` (seconds, or None if it
#: never began waiting), `signal_id` (the `SagaSignal` that ended it, or None) and
#: `error_code` ("" when the saga goes on). A wait ended by the saga turning back from outside
#: (an operator's abort, its deadline) is not announced here: its `saga_compensated` is.
saga_resumed = Signal()

#: A final saga's reconciliation check found the outside world disagreeing with its outcome
#: (`SagaDefinition.reconcile`), or found other discrepancies than it had recorded: the saga
#: is flagged. Also: `discrepancies`, a list of `{"code", "message", "repair"}` (`repair`:
#: `{"action": "compensate", "step", "note"}`, where the check offers one).
saga_discrepancy_found = Signal()
#: A flagged saga's check agrees with the outside world again: its flag is cleared.
saga_discrepancy_cleared = Signal()

BY_KIND: dict[str, Signal] = {
    EventKind.SAGA_STARTED: saga_started,
    EventKind.SAGA_COMPLETED: saga_completed,
    EventKind.SAGA_COMPENSATED: saga_compensated,
    EventKind.SAGA_FAILED: saga_failed,
    EventKind.SAGA_PAUSED: saga_paused,
    EventKind.STEP_FAILED: step_failed,
    EventKind.WAIT_STARTED: saga_waiting,
    EventKind.WAIT_COMPLETED: saga_resumed,
    EventKind.WAIT_TIMED_OUT: saga_resumed,
    EventKind.WAIT_FAILED: saga_resumed,
    EventKind.DISCREPANCY_FOUND: saga_discrepancy_found,
    EventKind.DISCREPANCY_CLEARED: saga_discrepancy_cleared,
}
# How a wait ended, by the kind of the event that ended it (`saga_resumed`).
RESUMED_HOW: dict[str, str] = {
    EventKind.WAIT_COMPLETED: "signal",
    EventKind.WAIT_TIMED_OUT: "timeout",
    EventKind.WAIT_FAILED: "failed",
}


def resumed_how(kind: str, detail: dict[str, Any]) -> str:
    """How a wait ended, from the event that ended it: its kind's (`RESUMED_HOW`), or an
    approval's decision."""
    decision = detail.get("decision")
    return decision if decision in ("approved", "rejected") else RESUMED_HOW[kind]


def _arguments(saga: Any, event: Any) -> dict[str, Any]:
    detail = event.detail
    found: dict[str, Any] = {"saga_id": saga.id, "definition": saga.name}
    kind = event.kind
    if kind == EventKind.SAGA_STARTED:
        found["input"] = saga.input
    elif kind == EventKind.SAGA_COMPENSATED:
        found["error_code"] = detail.get("error_code", saga.error_code)
    elif kind in (EventKind.SAGA_FAILED, EventKind.SAGA_PAUSED):
        found["step"] = detail.get("step")
        found["reason"] = detail.get("reason", "compensation_failed")
        # As the event recorded it (the saga may have moved on before the relay sends it).
        found["error_code"] = detail.get("error_code", saga.error_code)
        found["error_message"] = detail.get("error_message", saga.error_message)
    elif kind == EventKind.STEP_FAILED:
        found["step"] = event.step_name
        found["index"] = event.step_index
        found["attempt"] = detail.get("attempt")
        found["exhausted"] = bool(detail.get("exhausted"))
        found["error_code"] = detail.get("code", "")
        found["error_message"] = detail.get("message", "")
    elif kind == EventKind.WAIT_STARTED:
        found.update(stage=event.step_name, index=event.step_index, event=detail.get("event"))
        until = detail.get("until")
        found["until"] = parse_datetime(until) if until else None
    elif kind == EventKind.DISCREPANCY_FOUND:
        found["discrepancies"] = detail.get("discrepancies", [])
    elif kind in RESUMED_HOW:
        found.update(stage=event.step_name, index=event.step_index)
        found["how"] = resumed_how(kind, detail)
        found["error_code"] = detail.get("code", "")
        found["goes_on"] = not found["error_code"]
        waited = detail.get("duration_ms")
        found["waited"] = waited / 1000 if waited is not None else None
        found["signal_id"] = detail.get("signal")
    return found


def announce(saga: Any, events: Sequence[Any], ids: Sequence[int | None] = ()) -> None:
    """Send the signal of each committed event that has one (`sagas.engine.notify` and the
    relay call this); `ids`: the events' ids, in order, sent as `event_id`."""
    for i, event in enumerate(events):
        event_id = ids[i] if i < len(ids) else None
        signal = BY_KIND.get(event.kind)
        if signal is None or not signal.receivers:
            continue
        arguments = _arguments(saga, event)
        for receiver, result in signal.send_robust(sender=Saga, event_id=event_id, **arguments):
            if isinstance(result, Exception):
                logger.error(
                    "sagas: receiver %r of %s failed on saga %s",
                    receiver,
                    event.kind,
                    saga.id,
                    exc_info=result,
                )
