"""Waits: stages that wait for an event (a signal) or a time, holding no worker and no message.

A chain of steps ends at a wait (`unit.chain_of`). The transaction that completes the step
before it begins the wait (`enter_wait`): the wait's row becomes `waiting` with its due time,
the saga `waiting`; a signal kept for it (sent early) is consumed at once. Then either a signal
comes (`signal`), or the sweeper finds the wait due (`due_waits`, `timed_out`), or the saga
turns back (an operator's abort, its deadline), each under the saga's lock: exactly one of
them ends the wait, and the others find it over. What comes after the wait is sent as a new
chain under a new epoch (`go_on`).

Signals are rows (`SagaSignal`): one that comes before its wait is kept; one whose saga is
busy (a step holds its lock) is kept too, and the wait consumes it when the saga reaches it,
or the next sweep does (`apply_kept`) if the saga was already waiting; one for a wait that is
over is refused, and recorded.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import IntegrityError, transaction
from django.db.models import F, OuterRef, Subquery
from django.db.models.fields.json import KT
from django.utils import timezone

from ..definitions import PAYLOAD_MAX_BYTES, import_callable, is_wait
from ..exceptions import SagaBusy, SignalError
from ..models import (
    FINAL_STATUSES,
    Direction,
    EventKind,
    Saga,
    SagaEvent,
    SagaSignal,
    SagaStatus,
    SagaStep,
    SignalStatus,
    StepStatus,
    stage_definition,
)
from . import notify
from .compensation import begin_compensation
from .rows import StepRow
from .unit import BEGIN_STAGE, SafeError, Unit, lock

logger = logging.getLogger("sagas")

# Seconds a signal waits for a saga whose step holds its lock, before it is kept instead.
LOCK_WAIT = 2.0
# The error of a wait whose timeout passed (`on_timeout` "compensate" or "pause").
TIMED_OUT = SafeError("wait_timed_out", "The wait's timeout passed before its event came.")


@dataclass(frozen=True)
class SignalOutcome:
    """What became of a signal: `consumed` by its wait, `kept` for a wait to come (or for a
    saga that was busy), or `refused` (its wait is over; `reason` says why). `repeated`: the
    idempotency key was used before, and this is the first signal's outcome."""

    status: str
    signal_id: int
    stage: str = ""
    reason: str = ""
    repeated: bool = False


class NoSuchWait(SignalError):
    """The saga has no wait for this event."""


class NotASignal(SignalError):
    """The wait is an approval: a person decides it (approve, reject), not a signal."""

    def __init__(self, event: str) -> None:
        super().__init__(
            f"The wait for {event!r} is an approval: approve or reject it "
            "(with the permission sagas.approve_saga)."
        )


class NotWaiting(SignalError):
    """The saga is not waiting for this approval (yet): nothing to decide now."""


def _storable(value: Any) -> bool:
    """Whether PostgreSQL's jsonb takes the value: no NUL in its text, no lone surrogate."""
    if isinstance(value, str):
        if "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_storable(k) and _storable(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_storable(v) for v in value)
    return True


def storable_text(value: str) -> None:
    """Refuse text that PostgreSQL's jsonb cannot store (a NUL, a lone surrogate): a form's
    or a service's note, before it reaches the timeline."""
    if not _storable(value):
        raise ValidationError("Text with a NUL character or a lone surrogate cannot be stored.")


def check_payload(saga_id: UUID | str, event: str, payload: Any, *, fail: bool = False) -> None:
    """Refuse a payload its wait would not take (Django's `ValidationError`, by field): larger
    than the wait's `max_payload_bytes` as JSON, or refused by its `validate` (unless the
    signal `fail`s the wait). `NoSuchWait` if
    no wait of the saga is for `event`. Run before the saga is locked: `validate` is yours."""
    definitions = (
        SagaStep.objects.filter(saga_id=saga_id)
        .with_definition()
        .values_list("stage_definition", flat=True)
    )
    found = [d for d in definitions if is_wait(d) and d.get("event") == event]
    if not found:
        if not Saga.objects.filter(pk=saga_id).exists():
            raise Saga.DoesNotExist(f"no saga {saga_id}")
        raise NoSuchWait(f"The saga has no wait for the event {event!r}.")
    wait = found[0]
    if wait.get("approval"):
        raise NotASignal(event)
    if not _storable(payload):
        raise ValidationError(
            {"payload": "Text with a NUL character or a lone surrogate cannot be stored."}
        )
    size = len(json.dumps(payload, separators=(",", ":"), cls=DjangoJSONEncoder).encode())
    if size > int(wait.get("max_payload_bytes") or PAYLOAD_MAX_BYTES):
        raise ValidationError(
            {"payload": f"At most {wait['max_payload_bytes']} bytes of JSON (this is {size})."}
        )
    if wait.get("validate") and not fail:  # a signal that fails the wait carries no output
        try:
            import_callable(wait["validate"])(payload)
        except ValidationError as error:
            raise ValidationError({"payload": error.messages}) from None


# -- entering a wait --------------------------------------------------------------------------


def enter_wait(unit: Unit, step: StepRow) -> None:
    """Begin the wait `step` (its row pending): the saga waits for its event or its timeout.
    A signal kept for it is consumed at once. A wait whose `condition` is false is skipped;
    one whose `condition` or `until` raises (or whose `until` gives no aware time) fails, and
    the saga pauses for an operator (whose retry asks them again)."""
    definition = step.definition
    now = timezone.now()
    unit.set_saga(current_step=step.index)
    try:
        if not _condition_holds(unit, step):
            _skip(unit, step)
            return
        due = _due(unit, step, now)
    except Exception as exc:  # the project's code: a bug of its own, never the engine's
        logger.warning(
            "The wait %s of saga %s could not begin: %s",
            step.name,
            unit.saga.pk,
            type(exc).__name__,
        )
        _broken(unit, step, exc)
        return
    unit.move_step(
        step,
        StepStatus.WAITING,
        EventKind.WAIT_STARTED,
        {"event": definition.get("event"), "until": due.isoformat() if due else None},
        started_at=now,
        finished_at=None,
        due_at=due,
        error_code="",
        error_message="",
    )
    if unit.saga.status != SagaStatus.WAITING:
        unit.move_saga(SagaStatus.WAITING, None)
    event = definition.get("event")
    if event:
        kept = kept_for(unit.saga.pk, event)
        if kept:
            # Waiting again (an operator's retry after it timed out or failed): what came
            # after its previous end came too late for it, and is never applied later.
            ended = (
                SagaEvent.objects.filter(
                    saga_id=unit.saga.pk,
                    step_index=step.index,
                    kind__in=[EventKind.WAIT_TIMED_OUT, EventKind.WAIT_FAILED],
                )
                # A wait that never began (its condition or until raised) ended no waiting.
                .exclude(detail__code="wait_not_begun")
                .order_by("-id")
                .values_list("created_at", flat=True)
                .first()
            )
            for late in [s for s in kept if ended is not None and s.created_at <= ended]:
                _refuse(unit, step, late, "It came after its wait was over.")
                kept.remove(late)
        if kept:
            consume(unit, step, kept[0])
            return
    if due is not None and due <= now:  # `until` passed already: it times out at once
        timed_out(unit, step.index)


BEGIN_STAGE["wait"] = enter_wait


def _condition_holds(unit: Unit, step: StepRow) -> bool:
    condition = step.definition.get("condition")
    return not condition or bool(import_callable(condition)(unit.context(step)))


def _due(unit: Unit, step: StepRow, now: datetime) -> datetime | None:
    """When the wait times out: `timeout` seconds from now, or what its `until` says."""
    definition = step.definition
    if definition.get("timeout"):
        return now + timedelta(seconds=float(definition["timeout"]))
    if not definition.get("until"):
        return None
    due = import_callable(definition["until"])(unit.context(step))
    if due is None and definition.get("event"):
        return None
    if not isinstance(due, datetime) or timezone.is_naive(due):
        raise TypeError("until must give an aware datetime")
    return due


def _skip(unit: Unit, step: StepRow) -> None:
    """The wait's condition is false: it completes with no output. A signal kept for it (sent
    early) is discarded when the saga ends (`Unit.move_saga`), as no wait will consume it:
    not here, where every saga of a definition whose condition skips the wait would pay a
    query for the rare one that got a signal."""
    unit.move_step(
        step,
        StepStatus.COMPLETED,
        EventKind.WAIT_SKIPPED,
        {"reason": "its condition was false"},
        output=None,
        started_at=timezone.now(),
        finished_at=timezone.now(),
        due_at=None,
    )
    _go_on(unit, step)


def _broken(unit: Unit, step: StepRow, exc: Exception) -> None:
    error = SafeError(
        "wait_not_begun",
        f"The wait's condition or until raised {type(exc).__name__}; fix it and retry.",
    )
    unit.move_step(
        step,
        StepStatus.FAILED,
        EventKind.WAIT_FAILED,
        error.as_dict(),
        finished_at=timezone.now(),
        due_at=None,
        error_code=error.code,
        error_message=error.message,
    )
    unit.set_saga(error_code=error.code, error_message=error.message)
    unit.move_saga(
        SagaStatus.FAILED, EventKind.SAGA_PAUSED, {"step": step.name, "reason": error.code}
    )


def kept_for(saga_id: Any, event: str) -> list[SagaSignal]:
    """The saga's signals of `event` kept for a wait, oldest first."""
    kept = SagaSignal.objects.filter(saga_id=saga_id, event=event, status=SignalStatus.KEPT)
    return list(kept.order_by("id"))


def go_on(unit: Unit, index: int) -> None:
    """Go on from stage `index`: begin the wait or the group, or send the steps from it as a
    new chain (`Unit.go_on`)."""
    unit.go_on(index)


def begin(saga_id: UUID | str) -> None:
    """A saga whose first stage is a wait begins waiting (right after its start commits; the
    sweeper does it if this never ran)."""
    with transaction.atomic():
        unit = lock(saga_id)
        if unit.saga.status != SagaStatus.PENDING or unit.steps[0].status != StepStatus.PENDING:
            return
        go_on(unit, 0)
        unit.save()


# -- ending a wait ---------------------------------------------------------------------------


def consume(unit: Unit, step: StepRow, signal: SagaSignal) -> None:
    """The waiting `step` ends with `signal`: completed with its payload as the output, or
    failed if the signal fails it (a business failure of the wait)."""
    now = timezone.now()
    SagaSignal.objects.filter(pk=signal.pk).update(status=SignalStatus.CONSUMED, stage=step.index)
    signal.status, signal.stage = SignalStatus.CONSUMED, step.index
    refuse_kept(unit, step, "Its wait is over.")  # kept while the saga was busy, too late
    # An approval's decision, who took it and their note, on the timeline.
    decided = signal.payload if step.definition.get("approval") else None
    decided = decided if isinstance(decided, dict) else {}
    waited = _waited(step, now)
    if signal.fail:
        error = SafeError(
            str(signal.fail.get("code") or "wait_failed"),
            str(signal.fail.get("message") or "The event failed the wait."),
        )
        unit.move_step(
            step,
            StepStatus.FAILED,
            EventKind.WAIT_FAILED,
            {**error.as_dict(), "signal": signal.pk, **decided, **waited},
            finished_at=now,
            due_at=None,
            error_code=error.code,
            error_message=error.message,
        )
        _failed(unit, step, error, reason="failed by its event")
        return
    unit.move_step(
        step,
        StepStatus.COMPLETED,
        EventKind.WAIT_COMPLETED,
        {"signal": signal.pk, "event": signal.event, **decided, **waited},
        output=signal.payload,
        finished_at=now,
        due_at=None,
    )
    _go_on(unit, step)


def _waited(step: StepRow, now: datetime) -> dict[str, int]:
    """How long the wait `step` waited until `now`, for the event that ends it: the timeline,
    metrics, traces and `saga_resumed` read it there (its start may be weeks and processes
    away)."""
    if step.started_at is None:
        return {}
    return {"duration_ms": max(int((now - step.started_at).total_seconds() * 1000), 0)}


def timed_out(unit: Unit, index: int) -> bool:
    """The sweeper found the wait `index` due: end it as its `on_timeout` says. False if it
    is over already (a signal, an abort came first)."""
    step = unit.steps[index]
    due = step.due_at
    if unit.saga.status != SagaStatus.WAITING or step.status != StepStatus.WAITING:
        return False
    if due is None or due > timezone.now():
        return False
    event = step.definition.get("event")
    if event:
        kept = kept_for(unit.saga.pk, event)
        # One kept while the saga was busy, before the timeout: it came in time.
        in_time = [s for s in kept if s.created_at <= due]
        if in_time:
            consume(unit, step, in_time[0])
            return True
        for late in kept:
            _refuse(unit, step, late, "It came after its wait's timeout.")
    policy = step.definition.get("on_timeout") or "compensate"
    detail = {"action": policy, "due": due.isoformat(), **_waited(step, timezone.now())}
    if policy == "continue":
        unit.move_step(
            step,
            StepStatus.COMPLETED,
            EventKind.WAIT_TIMED_OUT,
            detail,
            output=None,
            finished_at=timezone.now(),
            due_at=None,
        )
        _go_on(unit, step)
        return True
    unit.move_step(
        step,
        StepStatus.FAILED,
        EventKind.WAIT_TIMED_OUT,
        {**detail, **TIMED_OUT.as_dict()},
        finished_at=timezone.now(),
        due_at=None,
        error_code=TIMED_OUT.code,
        error_message=TIMED_OUT.message,
    )
    _failed(unit, step, TIMED_OUT, reason="wait timed out", pause=policy == "pause")
    return True


def _go_on(unit: Unit, step: StepRow) -> None:
    """After a wait completed (or was skipped): the stages after it (a wait is never the
    last stage)."""
    unit.progressed()
    unit.move_saga(SagaStatus.RUNNING, None)
    go_on(unit, step.index + 1)


def _failed(
    unit: Unit, step: StepRow, error: SafeError, *, reason: str, pause: bool = False
) -> None:
    """A wait failed for good: compensate the saga, or pause it for an operator (its policy
    says so, or the saga passed its pivot)."""
    unit.set_saga(error_code=error.code, error_message=error.message)
    if pause or unit.passed_pivot():
        why = reason if pause else "failed after the pivot"
        unit.move_saga(SagaStatus.FAILED, EventKind.SAGA_PAUSED, {"step": step.name, "reason": why})
        return
    begin_compensation(unit, EventKind.COMPENSATION_STARTED, {"step": step.name, "reason": reason})


def end_for_compensation(unit: Unit) -> None:
    """The saga turns back while a wait waits (an operator's abort, its deadline): the wait
    ends, never completed (pending again, its due time gone)."""
    for step in unit.steps:
        if step.status == StepStatus.WAITING:
            unit.move_step(step, StepStatus.PENDING, None, due_at=None)


# -- signals ---------------------------------------------------------------------------------


def signal(
    saga_id: UUID | str,
    event: str,
    *,
    payload: Any = None,
    idempotency_key: str | None = None,
    fail: dict[str, str] | None = None,
    decision: bool = False,
) -> SignalOutcome:
    """Send `event` to the saga: consumed by its wait if the saga waits for it, kept if the
    wait is still to come (or the saga is busy for more than `LOCK_WAIT` seconds), refused if
    the wait is over. With an `idempotency_key` used before for this saga, the first signal's
    outcome, and nothing done. `NoSuchWait` if no wait of the saga is for this event;
    `Saga.DoesNotExist` if there is no such saga."""
    try:
        with transaction.atomic():
            unit = lock(saga_id, wait=LOCK_WAIT)
            first = _first(unit.saga.pk, idempotency_key)
            if first is not None:
                return first
            wait = _wait_for(unit, event, decision=decision)
            same = decision and _same_decision(
                unit.saga.pk, wait.name, wait.status, wait.definition, payload
            )
            if same:
                return same
            row = _store(unit.saga.pk, event, payload, idempotency_key, fail)
            notify.signal_received(unit.saga)
            outcome = _apply(unit, wait, row)
            unit.save()
        return outcome
    except SagaBusy:
        # A step holds the saga: keep the signal. The wait consumes it when the saga gets
        # there; if the saga was already waiting, the next sweep applies it (`apply_kept`).
        saga = Saga.objects.get(pk=saga_id)
        return _kept_while_busy(saga, event, payload, idempotency_key, fail, decision)


# -- approvals ---------------------------------------------------------------------------------

# The error of a rejected approval: a business failure of the wait.
REJECTED = SafeError("approval_rejected", "The approval was rejected.")


def decide(
    saga_id: UUID | str, *, approve: bool, actor: str, note: str = "", stage: str | None = None
) -> SignalOutcome:
    """Approve or reject the saga's approval `stage` (by default the one it waits at, or its
    only one). `NotWaiting` if the saga has not reached it (and still may); the same decision
    again, once taken, gets the first one's outcome (a double click, a resent form); the other
    decision then, or any after the wait is over (also one the saga never reached, as it
    turned back or finished), is refused and recorded. `actor` is who decides."""
    approvals = [
        (name, d, status)
        for name, d, status in SagaStep.objects.filter(saga_id=saga_id)
        .order_by("index")
        .with_definition()
        .values_list("name", "stage_definition", "status")
        if is_wait(d) and d.get("approval")
    ]
    if not approvals:
        if not Saga.objects.filter(pk=saga_id).exists():
            raise Saga.DoesNotExist(f"no saga {saga_id}")
        raise NoSuchWait("The saga has no approval.")
    if stage is not None:
        chosen = [a for a in approvals if a[0] == stage]
        if not chosen:
            raise NoSuchWait(f"The saga has no approval named {stage!r}.")
    else:
        chosen = [a for a in approvals if a[2] == StepStatus.WAITING] or approvals
        if len(chosen) > 1:
            names = ", ".join(a[0] for a in chosen)
            raise SignalError(f"The saga has several approvals ({names}): name the stage.")
    name, definition, status = chosen[0]
    decision = "approved" if approve else "rejected"
    if status == StepStatus.PENDING and not _turned_back(saga_id):
        raise NotWaiting(f"The saga is not waiting for the approval {name!r} yet.")
    payload = {"decision": decision, "by": actor, "note": note}
    if not _storable(payload):
        raise ValidationError(
            {"note": "Text with a NUL character or a lone surrogate cannot be stored."}
        )
    return signal(
        saga_id,
        definition["event"],
        payload=payload,
        fail=None if approve else REJECTED.as_dict(),
        decision=True,
    )


def _same_decision(
    saga_id: Any, name: str, status: str, definition: dict[str, Any], payload: Any
) -> SignalOutcome | None:
    """The approval `name` is over, decided the way `payload` decides it: that decision's
    outcome, again (a double click, a form sent twice)."""
    if status == StepStatus.WAITING or not isinstance(payload, dict):
        return None
    last = (
        SagaSignal.objects.filter(
            saga_id=saga_id, event=definition["event"], status=SignalStatus.CONSUMED
        )
        .order_by("-id")
        .first()
    )
    if last is None or (last.payload or {}).get("decision") != payload.get("decision"):
        return None
    return SignalOutcome(last.status, last.pk, name, repeated=True)


def _turned_back(saga_id: UUID | str) -> bool:
    """Whether the saga is compensating or finished: a stage still pending then is never
    reached (an operator's abort ends a wait as pending again), and the saga never goes
    forward again, so a decision on it is late, not early."""
    saga = Saga.objects.filter(pk=saga_id).values("status", "direction").first()
    return saga is not None and (
        saga["direction"] == Direction.BACKWARD or saga["status"] in FINAL_STATUSES
    )


def _first(saga_id: Any, key: str | None) -> SignalOutcome | None:
    if key is None:
        return None
    row = SagaSignal.objects.filter(saga_id=saga_id, idempotency_key=key).first()
    if row is None:
        return None
    return SignalOutcome(row.status, row.pk, _stage_name(row), row.reason, repeated=True)


def _stage_name(row: SagaSignal) -> str:
    if row.stage is None:
        return ""
    name = SagaStep.objects.filter(saga_id=row.saga_id, index=row.stage).values_list(
        "name", flat=True
    )
    return next(iter(name), "")


def _wait_for(unit: Unit, event: str, *, decision: bool = False) -> StepRow:
    for step in unit.steps:
        if is_wait(step.definition) and step.definition.get("event") == event:
            if bool(step.definition.get("approval")) != decision:
                raise NotASignal(event) if not decision else NoSuchWait(event)
            return step
    raise NoSuchWait(f"The saga has no wait for the event {event!r}.")


def _store(
    saga_id: Any, event: str, payload: Any, key: str | None, fail: dict[str, str] | None
) -> SagaSignal:
    return SagaSignal.objects.create(
        saga_id=saga_id,
        event=event,
        payload=payload,
        fail=fail,
        idempotency_key=key,
        status=SignalStatus.KEPT,
    )


def _apply(unit: Unit, wait: StepRow, row: SagaSignal) -> SignalOutcome:
    saga = unit.saga
    if saga.status == SagaStatus.WAITING and wait.status == StepStatus.WAITING:
        consume(unit, wait, row)
        return SignalOutcome(SignalStatus.CONSUMED, row.pk, wait.name)
    ahead = wait.status == StepStatus.PENDING and not saga.is_backward and not saga.is_final
    if ahead:
        unit.event(EventKind.SIGNAL_KEPT, wait, {"signal": row.pk, "event": row.event})
        return SignalOutcome(SignalStatus.KEPT, row.pk, wait.name)
    reason = _over(unit, wait)
    _refuse(unit, wait, row, reason)
    return SignalOutcome(SignalStatus.REFUSED, row.pk, wait.name, reason)


def refuse_kept(unit: Unit, wait: StepRow, reason: str) -> None:
    """The wait is over (consumed, marked as done): the signals still kept for its event,
    which a saga busy at the time kept, are refused now, never applied later."""
    event = wait.definition.get("event")
    if event:
        for row in kept_for(unit.saga.pk, event):
            _refuse(unit, wait, row, reason)


def _refuse(unit: Unit, wait: StepRow, row: SagaSignal, reason: str) -> None:
    SagaSignal.objects.filter(pk=row.pk).update(status=SignalStatus.REFUSED, reason=reason)
    row.status, row.reason = SignalStatus.REFUSED, reason
    unit.event(
        EventKind.SIGNAL_REFUSED, wait, {"signal": row.pk, "event": row.event, "reason": reason}
    )


def _over(unit: Unit, wait: StepRow) -> str:
    if unit.saga.is_final:
        return f"The saga is {unit.saga.status}."
    if unit.saga.is_backward:
        return "The saga is compensating."
    if wait.status == StepStatus.COMPLETED:
        return "Its wait is over."
    return f"Its wait is over ({wait.error_code or wait.status})."


def _kept_while_busy(
    saga: Saga,
    event: str,
    payload: Any,
    key: str | None,
    fail: dict[str, str] | None,
    decision: bool = False,
) -> SignalOutcome:
    """The signal of a saga a step (or an operator) holds, decided without its lock from what
    is committed: kept if its wait is still to come or waiting, else refused; either way
    stored, and once per key. A wait that ends meanwhile refuses a signal kept after its end
    (`timed_out`, `enter_wait`)."""
    first = _first(saga.pk, key)
    if first is not None:
        return first
    waits = (
        SagaStep.objects.filter(saga=saga)
        .with_definition()
        .values_list("name", "stage_definition", "status")
    )
    found = [(n, st, d) for n, d, st in waits if is_wait(d) and d.get("event") == event]
    if not found:
        raise NoSuchWait(f"The saga has no wait for the event {event!r}.")
    name, wait_status, definition = found[0]
    if bool(definition.get("approval")) != decision:
        raise NotASignal(event) if not decision else NoSuchWait(event)
    if decision and (same := _same_decision(saga.pk, name, wait_status, definition, payload)):
        return same
    reason = ""
    if saga.is_final:
        reason = f"The saga is {saga.status}."
    elif saga.direction == "backward":
        reason = "The saga is compensating."
    elif wait_status not in (StepStatus.PENDING, StepStatus.WAITING):
        reason = f"Its wait is over ({wait_status})."
    try:
        with transaction.atomic():
            row = _store(saga.pk, event, payload, key, fail)
            if reason:
                row.status, row.reason = SignalStatus.REFUSED, reason
                row.save(update_fields=["status", "reason"])
            notify.signal_received(saga, refused=bool(reason))
    except IntegrityError:  # the key, at the same moment
        first = _first(saga.pk, key)
        if first is None:
            raise
        return first
    if reason:
        return SignalOutcome(SignalStatus.REFUSED, row.pk, name, reason)
    return SignalOutcome(SignalStatus.KEPT, row.pk, name)


def apply_kept(*, batch_size: int = 200) -> int:
    """Consume the signals kept for a wait the saga had already reached when they came (it
    was busy), oldest first; returns how many. Run by the sweeper."""
    # Ordered by index alone: the model's ordering would join the saga table to sort.
    current_event = (
        SagaStep.objects.filter(saga_id=OuterRef("saga_id"), status=StepStatus.WAITING)
        .order_by("index")
        .alias(stage_definition=stage_definition())
        .values(event=KT("stage_definition__event"))[:1]
    )
    due = (
        SagaSignal.objects.filter(status=SignalStatus.KEPT, saga__status=SagaStatus.WAITING)
        .annotate(waited_for=Subquery(current_event))
        .filter(waited_for=F("event"))
        .order_by("id")
        .values_list("pk", "saga_id")[:batch_size]
    )
    applied = 0
    for signal_id, saga_id in list(due):
        with transaction.atomic():
            try:
                unit = lock(saga_id, wait=0.1)
            except SagaBusy:
                continue
            step = unit.steps[unit.saga.current_step]
            if unit.saga.status != SagaStatus.WAITING or step.status != StepStatus.WAITING:
                continue
            kept = SagaSignal.objects.filter(pk=signal_id, status=SignalStatus.KEPT).first()
            if kept is None or kept.event != step.definition.get("event"):
                continue
            consume(unit, step, kept)
            unit.save()
            applied += 1
    return applied


def due_waits(now: datetime, batch_size: int = 200) -> list[tuple[Any, int]]:
    """The (saga id, stage index) of the waits whose timeout is due, the earliest first."""
    return list(
        SagaStep.objects.filter(status=StepStatus.WAITING, due_at__lte=now)
        .order_by("due_at")
        .values_list("saga_id", "index")[:batch_size]
    )
