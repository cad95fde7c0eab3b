"""The engine: every saga and step transition happens here, under the saga's row lock.

A unit of work locks the saga row (and reads its step rows in the same query), applies
transitions through `Unit`, and writes the changed rows and their events before the
transaction commits. Celery tasks (`sagas.tasks`) and the operator services call these
functions; nothing else changes a status.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cache
from typing import Any
from uuid import UUID

from celery.exceptions import SoftTimeLimitExceeded
from django.db import IntegrityError, connection, transaction
from django.db.models import Field
from django.db.transaction import TransactionManagementError
from django.utils import timezone
from django.utils.module_loading import import_string

from .definitions import RetryPolicy, StepContext
from .exceptions import InvalidTransition, StepError, TransientError
from .models import EventKind, Saga, SagaEvent, SagaStatus, SagaStep, StepStatus

logger = logging.getLogger("sagas")

S, T = SagaStatus, StepStatus

SAGA_TRANSITIONS: dict[str, set[str]] = {
    S.PENDING: {S.RUNNING, S.COMPENSATING},
    S.RUNNING: {S.COMPLETED, S.COMPENSATING, S.FAILED},
    S.COMPENSATING: {S.COMPENSATED, S.FAILED},
    S.FAILED: {S.RUNNING, S.COMPENSATING, S.COMPENSATED},
    S.COMPLETED: set(),
    S.COMPENSATED: set(),
}

STEP_TRANSITIONS: dict[str, set[str]] = {
    T.PENDING: {T.RUNNING, T.COMPLETED, T.FAILED},
    T.RUNNING: {T.RUNNING, T.COMPLETED, T.FAILED},
    T.COMPLETED: {T.COMPENSATING, T.COMPENSATED},
    T.FAILED: {T.PENDING, T.COMPENSATING, T.COMPENSATED},
    T.COMPENSATING: {T.COMPENSATING, T.COMPENSATED, T.COMPENSATION_FAILED},
    T.COMPENSATION_FAILED: {T.COMPENSATING, T.COMPENSATED},
    T.COMPENSATED: set(),
}

# Steps whose compensation is still owed when a saga compensates.
OWED = {T.COMPLETED, T.COMPENSATING, T.COMPENSATION_FAILED}


@dataclass(frozen=True)
class SafeError:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def safe_error(exc: BaseException, *, time_limit: int | None = None) -> SafeError:
    """A code and message fit to store and show: never a traceback or exception text."""
    if isinstance(exc, StepError):
        return SafeError(exc.code, exc.message[:500])
    if isinstance(exc, SoftTimeLimitExceeded):
        return SafeError("time_limit", f"The step exceeded its time limit of {time_limit} s.")
    return SafeError("unexpected_error", f"Unexpected error ({type(exc).__name__}).")


@cache
def _import(path: str) -> Any:
    return import_string(path)


def is_transient(exc: BaseException, policy: RetryPolicy) -> bool:
    if isinstance(exc, TransientError | SoftTimeLimitExceeded):
        return True
    return any(isinstance(exc, _import(str(path))) for path in policy.transient)


@dataclass
class Unit:
    """A locked saga with its steps, and the changes and events to write with it."""

    saga: Saga
    steps: list[SagaStep]
    events: list[SagaEvent] = field(default_factory=list)
    changed_steps: dict[int, set[str]] = field(default_factory=dict)
    saga_fields: set[str] = field(default_factory=set)
    after_commit: list[Callable[[], None]] = field(default_factory=list)

    # -- transitions: the only code that changes a status --------------------------------

    def move_saga(self, to: str, kind: str | None, detail: dict[str, Any] | None = None) -> None:
        if to != self.saga.status and to not in SAGA_TRANSITIONS[self.saga.status]:
            raise InvalidTransition(f"saga cannot go from {self.saga.status} to {to}")
        self.saga.status = to
        final = to in (S.COMPLETED, S.COMPENSATED)
        self.set_saga(status=to, finished_at=timezone.now() if final else None)
        if kind:
            self.event(kind, None, detail)

    def move_step(
        self,
        step: SagaStep,
        to: str,
        kind: str | None,
        detail: dict[str, Any] | None = None,
        **values: Any,
    ) -> None:
        if to != step.status and to not in STEP_TRANSITIONS[step.status]:
            raise InvalidTransition(f"step {step.name} cannot go from {step.status} to {to}")
        step.status = to
        for name, value in values.items():
            setattr(step, name, value)
        self.changed_steps.setdefault(step.index, set()).update({"status", *values})
        if kind:
            self.event(kind, step, detail)

    def set_saga(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self.saga, name, value)
        self.saga_fields.update(values)

    def event(self, kind: str, step: SagaStep | None, detail: dict[str, Any] | None) -> None:
        self.events.append(
            SagaEvent(
                saga_id=self.saga.pk,
                step_index=step.index if step else None,
                step_name=step.name if step else "",
                kind=kind,
                detail=detail or {},
                created_at=timezone.now(),
            )
        )

    def save(self) -> None:
        """Write the changed rows and the events in one statement (one round trip)."""
        # Always touch the saga: updated_at is how the sweeper sees progress.
        self.saga.updated_at = timezone.now()
        writes: list[Sql | None] = [_update_sql(self.saga, self.saga_fields | {"updated_at"})]
        writes += [_update_sql(self.steps[i], f) for i, f in self.changed_steps.items()]
        writes.append(_insert_events_sql(self.events))
        _execute_as_one(writes)
        for callback in self.after_commit:
            transaction.on_commit(_publish_or_leave_to_sweeper(self.saga.pk, callback))

    # -- reading ---------------------------------------------------------------------------

    def outputs_before(self, index: int) -> dict[str, Any]:
        return {s.name: s.output for s in self.steps[:index] if s.status == T.COMPLETED}

    def context(self, step: SagaStep, attempt: int) -> StepContext:
        return StepContext(
            saga_id=self.saga.pk,
            step=step.name,
            input=self.saga.input,
            outputs=self.outputs_before(step.index),
            attempt=attempt,
            output=step.output,
        )

    def owed_compensations(self) -> list[SagaStep]:
        """Steps still to compensate, in the order to compensate them (reverse)."""
        owed = [s for s in self.steps if s.status in OWED or self._failed_and_compensable(s)]
        return sorted(owed, key=lambda s: s.index, reverse=True)

    def _failed_and_compensable(self, step: SagaStep) -> bool:
        return step.status == T.FAILED and step.definition.get("compensate_failed_step", False)

    def passed_pivot(self) -> bool:
        return any(s.definition.get("pivot") and s.status == T.COMPLETED for s in self.steps)


Sql = tuple[str, list[Any]]


def _update_sql(obj: Saga | SagaStep, fields: set[str]) -> Sql:
    meta, conn = type(obj)._meta, connection
    columns = [_concrete(meta.get_field(name)) for name in sorted(fields)]
    assignments = ", ".join(f"{_quoted_column(f)} = %s" for f in columns)
    params = [f.get_db_prep_save(getattr(obj, f.attname), conn) for f in columns]
    sql = f"UPDATE {conn.ops.quote_name(meta.db_table)} SET {assignments} WHERE id = %s"
    return sql, [*params, obj.pk]


def _concrete(field: Any) -> Field[Any, Any]:
    assert isinstance(field, Field), f"{field} is not a column"
    return field


def _quoted_column(field: Field[Any, Any]) -> str:
    assert field.column, f"{field} has no column"
    return connection.ops.quote_name(field.column)


def _insert_events_sql(events: list[SagaEvent]) -> Sql | None:
    if not events:
        return None
    meta, conn = SagaEvent._meta, connection
    fields = [f for f in meta.concrete_fields if not f.primary_key]
    names = ", ".join(_quoted_column(_concrete(f)) for f in fields)
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    params = [f.get_db_prep_save(getattr(e, f.attname), conn) for e in events for f in fields]
    table = conn.ops.quote_name(meta.db_table)
    return f"INSERT INTO {table} ({names}) VALUES {', '.join([row] * len(events))}", params


def _execute_as_one(writes: list[Sql | None]) -> None:
    """Run several INSERT/UPDATE statements as one, with PostgreSQL's writable CTEs.

    A step's completion changes its row, the saga's row and adds events: sent separately that
    is three round trips inside the step's transaction, on the hot path of every step.
    """
    statements = [w for w in writes if w is not None]
    *first, last = statements
    ctes = ", ".join(f"w{i} AS ({sql})" for i, (sql, _) in enumerate(first))
    sql = (f"WITH {ctes} " if ctes else "") + last[0]
    params = [p for _, ps in first for p in ps] + last[1]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def _publish_or_leave_to_sweeper(saga_id: Any, send: Callable[[], None]) -> Callable[[], None]:
    """Send messages after the commit; if the broker is down, the sweeper sends them later.

    The saga's rows are committed either way, so the caller must not see an error for it.
    """

    def publish() -> None:
        try:
            send()
        except Exception as exc:
            logger.warning(
                "saga %s: could not publish its next messages (%s); "
                "the recovery sweeper will send them",
                saga_id,
                type(exc).__name__,
            )

    return publish


def lock(saga_id: UUID | str) -> Unit:
    """Lock the saga row, then read its steps. Call inside a transaction.

    Two statements on purpose: a `FOR UPDATE OF saga` joined with the steps would, after
    waiting for the lock, re-check only the saga row and return the step rows as they were
    before the wait. Read after the lock, in a new statement (READ COMMITTED takes a new
    snapshot), the steps are current: every writer of a step holds its saga's lock.
    """
    if not connection.in_atomic_block:  # as select_for_update() would refuse
        raise TransactionManagementError("lock() must run inside a transaction")
    saga_sql, steps_sql = _lock_sql()
    # Raw queries: the same statements the ORM would build, without building them on every
    # step (compiling the two querysets cost more than running them; see `make profile`).
    saga = next(iter(Saga.objects.raw(saga_sql, [UUID(str(saga_id))])), None)
    if saga is None:
        raise Saga.DoesNotExist(f"no saga {saga_id}")
    steps = list(SagaStep.objects.raw(steps_sql, [saga.pk]))
    for step in steps:
        step.saga = saga
    return Unit(saga=saga, steps=steps)


@cache
def _lock_sql() -> tuple[str, str]:
    q = connection.ops.quote_name
    sagas, steps = q(Saga._meta.db_table), q(SagaStep._meta.db_table)
    return (
        f"SELECT * FROM {sagas} WHERE id = %s FOR UPDATE",
        f"SELECT * FROM {steps} WHERE saga_id = %s ORDER BY {q('index')}",
    )


def _worker() -> str:
    """Which process ran a step: shown in the timeline, to tell workers apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _call(path: str, ctx: StepContext) -> Any:
    return _import(path)(ctx)


def _policy(step: SagaStep, key: str) -> RetryPolicy:
    return RetryPolicy.from_dict(step.definition[key])


# -- dispatch -------------------------------------------------------------------------------


def _dispatch_forward(unit: Unit, start: int) -> None:
    from .tasks import dispatch_steps

    saga_id = str(unit.saga.pk)
    limits = [(s.index, s.definition["time_limit"]) for s in unit.steps[start:]]
    unit.after_commit.append(lambda: dispatch_steps(saga_id, limits))


def _dispatch_compensations(unit: Unit, steps: Iterable[SagaStep]) -> None:
    from .tasks import dispatch_compensations

    saga_id = str(unit.saga.pk)
    indexes = [s.index for s in steps]
    if indexes:
        unit.after_commit.append(lambda: dispatch_compensations(saga_id, indexes))


# -- outcomes of the task functions --------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a task should do next: continue the chain, stop it, retry, or fail."""

    kind: str  # "done", "duplicate", "stop", "retry", "fail"
    countdown: float = 0.0
    error: SafeError | None = None
    exhausted: bool = False  # "fail" after transient retries ran out


DONE, DUPLICATE, STOP = Outcome("done"), Outcome("duplicate"), Outcome("stop")


# -- start ----------------------------------------------------------------------------------


def start(
    name: str,
    input: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    created_by: Any = None,
) -> tuple[Saga, bool]:
    """Create the saga and its step rows; send the chain when the transaction commits."""
    from .definitions import get_definition

    definition = get_definition(name)
    with transaction.atomic():
        if idempotency_key is not None:
            existing = Saga.objects.filter(name=name, idempotency_key=idempotency_key).first()
            if existing is not None:
                return existing, False
        try:
            with transaction.atomic():
                saga = Saga.objects.create(
                    name=name,
                    input=input,
                    deadline_at=(
                        timezone.now() + timedelta(seconds=definition.deadline)
                        if definition.deadline
                        else None
                    ),
                    idempotency_key=idempotency_key,
                    created_by=created_by,
                    options={
                        "on_complete": definition.on_complete,
                        "continue_compensation_on_failure": (
                            definition.continue_compensation_on_failure
                        ),
                    },
                )
        except IntegrityError:
            # Another request with the same key committed first: return its saga.
            if idempotency_key is None:
                raise
            existing = Saga.objects.filter(name=name, idempotency_key=idempotency_key).first()
            if existing is None:
                raise
            return existing, False
        steps = SagaStep.objects.bulk_create(
            SagaStep(saga=saga, index=i, name=step.name, definition=step.snapshot())
            for i, step in enumerate(definition.steps)
        )
        unit = Unit(saga=saga, steps=list(steps))
        unit.event(EventKind.SAGA_STARTED, None, {"steps": [s.name for s in definition.steps]})
        _dispatch_forward(unit, 0)
        SagaEvent.objects.bulk_create(unit.events)
        transaction.on_commit(_publish_or_leave_to_sweeper(saga.pk, unit.after_commit[0]))
    return saga, True


def _record_duplicate(unit: Unit, step: SagaStep, what: str) -> None:
    """A redelivered message found its work done: record it, change nothing else."""
    logger.info("saga %s: %s of %s already done, duplicate ignored", unit.saga.pk, what, step.name)
    unit.event(EventKind.DUPLICATE_IGNORED, step, {"of": what})
    SagaEvent.objects.bulk_create(unit.events)


# -- forward steps --------------------------------------------------------------------------


def run_step(saga_id: str, index: int, *, attempt: int, fault: Any = None) -> Outcome:
    """Run one step's action and record its completion in the same transaction."""
    with transaction.atomic():
        unit = lock(saga_id)
        saga, step = unit.saga, unit.steps[index]
        if step.status == T.COMPLETED:
            _record_duplicate(unit, step, "action")
            return DUPLICATE
        if saga.status == S.PENDING:
            unit.move_saga(S.RUNNING, None)  # the start was recorded when the saga was created
        if saga.status != S.RUNNING or step.status not in (T.PENDING, T.RUNNING):
            return STOP
        if any(s.status != T.COMPLETED for s in unit.steps[:index]):
            return STOP  # an earlier step is not done: this message is stale
        started = step.started_at or timezone.now()
        if fault is not None:
            fault.before_action()
        output = _call(step.definition["action"], unit.context(step, attempt))
        if fault is not None:
            fault.after_action()
        finished = timezone.now()
        unit.move_step(
            step,
            T.COMPLETED,
            EventKind.STEP_COMPLETED,
            {
                "attempt": attempt,
                "duration_ms": int((finished - started).total_seconds() * 1000),
                "worker": _worker(),
            },
            output=output,
            attempts=step.attempts + 1,
            started_at=started,
            finished_at=finished,
            error_code="",
            error_message="",
        )
        if index + 1 == len(unit.steps):
            on_complete = saga.options.get("on_complete")
            if on_complete:
                outputs = unit.outputs_before(len(unit.steps))
                _call(on_complete, StepContext(saga.pk, "", saga.input, outputs, attempt))
            unit.move_saga(S.COMPLETED, EventKind.SAGA_COMPLETED)
        else:
            unit.set_saga(current_step=index + 1)
        unit.save()
    return DONE


def step_attempt_failed(saga_id: str, index: int, exc: BaseException, *, attempt: int) -> Outcome:
    """Record a failed attempt; say whether to retry (transient, tries left) or to fail."""
    with transaction.atomic():
        unit = lock(saga_id)
        saga, step = unit.saga, unit.steps[index]
        if step.status not in (T.PENDING, T.RUNNING) or saga.status not in (S.RUNNING, S.PENDING):
            return STOP
        policy = _policy(step, "retry")
        error = safe_error(exc, time_limit=step.definition["time_limit"])
        transient = is_transient(exc, policy)
        now = timezone.now()
        values: dict[str, Any] = {
            "attempts": step.attempts + 1,
            "error_code": error.code,
            "error_message": error.message,
            "started_at": step.started_at or now,
        }
        if transient and attempt < policy.max_attempts:
            countdown = policy.countdown(attempt)
            unit.move_step(
                step,
                T.RUNNING,
                EventKind.STEP_RETRYING,
                {**error.as_dict(), "attempt": attempt, "retry_in_s": round(countdown, 3)},
                **values,
            )
            unit.set_saga(current_step=index)
            unit.save()
            return Outcome("retry", countdown=countdown, error=error)
        # Final failure: the chain's error callback takes it from here (step_failed).
        for name, value in values.items():
            setattr(step, name, value)
        unit.changed_steps.setdefault(index, set()).update(values)
        unit.set_saga(current_step=index)
        unit.save()
        return Outcome("fail", error=error, exhausted=transient)


def step_failed(
    saga_id: str, index: int, *, exhausted: bool, error: SafeError | None = None
) -> None:
    """The chain's error callback: a step failed for good. Idempotent.

    Marks the step failed; then pauses the saga (the step's policy says so for exhausted
    retries, or the saga passed its pivot) or compensates the completed steps in reverse order.
    """
    with transaction.atomic():
        unit = lock(saga_id)
        saga, step = unit.saga, unit.steps[index]
        if saga.status not in (S.RUNNING, S.PENDING) or step.status not in (T.PENDING, T.RUNNING):
            logger.info("saga %s: error callback for %s repeated, ignored", saga_id, step.name)
            return
        if error is None or step.error_code:  # the attempt recorded its own error
            error = SafeError(step.error_code or "unexpected_error", step.error_message)
        unit.move_step(
            step,
            T.FAILED,
            EventKind.STEP_FAILED,
            {**error.as_dict(), "exhausted": exhausted},
            finished_at=timezone.now(),
            error_code=error.code,
            error_message=error.message,
        )
        if saga.status == S.PENDING:
            unit.move_saga(S.RUNNING, None)
        unit.set_saga(current_step=index, error_code=error.code, error_message=error.message)
        pause = exhausted and step.definition.get("on_exhausted") == "pause"
        if pause or unit.passed_pivot():
            reason = "paused by policy" if pause else "failed after the pivot"
            unit.move_saga(S.FAILED, EventKind.SAGA_PAUSED, {"step": step.name, "reason": reason})
        else:
            _begin_compensation(unit, EventKind.COMPENSATION_STARTED)
        unit.save()


def _begin_compensation(unit: Unit, kind: str, detail: dict[str, Any] | None = None) -> None:
    for step in unit.steps:
        if step.status == T.RUNNING:  # aborted between two attempts
            unit.move_step(step, T.FAILED, None, finished_at=timezone.now())
    owed = unit.owed_compensations()
    unit.move_saga(S.COMPENSATING, kind, {**(detail or {}), "steps": [s.name for s in owed]})
    for step in owed:
        if step.status == T.COMPENSATION_FAILED:
            unit.move_step(step, T.COMPENSATING, None)
    if owed:
        unit.set_saga(current_step=owed[0].index)
        _dispatch_compensations(unit, owed)
    else:
        unit.move_saga(S.COMPENSATED, EventKind.SAGA_COMPENSATED)


# -- compensations --------------------------------------------------------------------------


def compensate_step(saga_id: str, index: int, *, attempt: int, fault: Any = None) -> Outcome:
    """Run one step's compensation and record it in the same transaction."""
    with transaction.atomic():
        unit = lock(saga_id)
        saga, step = unit.saga, unit.steps[index]
        if step.status == T.COMPENSATED:
            _record_duplicate(unit, step, "compensation")
            return DUPLICATE
        if saga.status != S.COMPENSATING or step not in unit.owed_compensations():
            return STOP
        owed_later = [s for s in unit.owed_compensations() if s.index > index]
        if any(s.status != T.COMPENSATION_FAILED for s in owed_later):
            return STOP  # a later step is still owed: this message is out of order
        if fault is not None:
            fault.before_compensation()
        if step.compensation:
            _call(step.compensation, unit.context(step, attempt))
        unit.move_step(
            step,
            T.COMPENSATED,
            EventKind.STEP_COMPENSATED,
            {"attempt": attempt},
            compensated_at=timezone.now(),
            compensation_attempts=step.compensation_attempts + 1,
        )
        _finish_compensation_if_done(unit)
        unit.save()
    return DONE


def _finish_compensation_if_done(unit: Unit) -> None:
    remaining = [s for s in unit.owed_compensations() if s.status != T.COMPENSATION_FAILED]
    if remaining:
        unit.set_saga(current_step=remaining[0].index)
        return
    failed = [s for s in unit.steps if s.status == T.COMPENSATION_FAILED]
    if failed:
        unit.set_saga(
            current_step=failed[0].index,
            error_code="compensation_failed",
            error_message=f"The compensation of step {failed[0].name} failed.",
        )
        unit.move_saga(S.FAILED, EventKind.SAGA_FAILED, {"step": failed[0].name})
    else:
        unit.move_saga(S.COMPENSATED, EventKind.SAGA_COMPENSATED)


def compensation_attempt_failed(
    saga_id: str, index: int, exc: BaseException, *, attempt: int
) -> Outcome:
    """Record a failed compensation attempt; retry while the policy allows, else fail."""
    with transaction.atomic():
        unit = lock(saga_id)
        saga, step = unit.saga, unit.steps[index]
        if saga.status != S.COMPENSATING or step not in unit.owed_compensations():
            return STOP
        policy = _policy(step, "compensation_retry")
        error = safe_error(exc, time_limit=step.definition["time_limit"])
        values: dict[str, Any] = {
            "compensation_attempts": step.compensation_attempts + 1,
            "error_code": error.code,
            "error_message": error.message,
        }
        if attempt < policy.max_attempts:
            countdown = policy.countdown(attempt)
            unit.move_step(
                step,
                T.COMPENSATING,
                EventKind.COMPENSATION_RETRYING,
                {**error.as_dict(), "attempt": attempt, "retry_in_s": round(countdown, 3)},
                **values,
            )
            unit.save()
            return Outcome("retry", countdown=countdown, error=error)
        unit.move_step(step, T.COMPENSATING, None, **values)
        unit.save()
        return Outcome("fail", error=error)


def compensation_failed(saga_id: str, index: int) -> None:
    """The compensation chain's error callback: a compensation exhausted its retries. Idempotent."""
    with transaction.atomic():
        unit = lock(saga_id)
        saga, step = unit.saga, unit.steps[index]
        if saga.status != S.COMPENSATING or step.status != T.COMPENSATING:
            logger.info("saga %s: compensation error callback repeated, ignored", saga_id)
            return
        unit.move_step(
            step,
            T.COMPENSATION_FAILED,
            EventKind.COMPENSATION_FAILED,
            {"code": step.error_code, "message": step.error_message},
        )
        remaining = [s for s in unit.owed_compensations() if s.status != T.COMPENSATION_FAILED]
        if remaining and saga.options.get("continue_compensation_on_failure"):
            _dispatch_compensations(unit, remaining)
            unit.set_saga(current_step=remaining[0].index)
        else:
            unit.set_saga(
                current_step=index,
                error_code="compensation_failed",
                error_message=f"The compensation of step {step.name} failed.",
            )
            unit.move_saga(S.FAILED, EventKind.SAGA_FAILED, {"step": step.name})
        unit.save()


# -- recovery -------------------------------------------------------------------------------


def recover(saga_id: UUID | str, *, max_recoveries: int) -> bool:
    """Re-dispatch a stalled saga from its rows; past the limit, fail it for an operator.

    Returns whether the saga was re-dispatched. Call inside the sweeper's transaction.
    """
    unit = lock(saga_id)
    saga = unit.saga
    if saga.status not in (S.PENDING, S.RUNNING, S.COMPENSATING):
        return False
    attempts = saga.recovery_attempts + 1
    unit.set_saga(recovery_attempts=attempts)
    if attempts > max_recoveries:
        message = f"No progress after {max_recoveries} recovery attempts; needs an operator."
        unit.set_saga(error_code="recovery_exhausted", error_message=message)
        if saga.status == S.PENDING:
            unit.move_saga(S.RUNNING, None)
        unit.move_saga(S.FAILED, EventKind.SAGA_FAILED, {"reason": "recovery_exhausted"})
        unit.save()
        return False
    if saga.status == S.COMPENSATING:
        owed = [s for s in unit.owed_compensations() if s.status != T.COMPENSATION_FAILED]
        unit.event(EventKind.RECOVERED, None, {"attempt": attempts, "compensations": len(owed)})
        if owed:
            _dispatch_compensations(unit, owed)
        else:
            _finish_compensation_if_done(unit)
    else:
        first = _first_unfinished(unit)
        unit.event(EventKind.RECOVERED, None, {"attempt": attempts, "from_step": first})
        if first < len(unit.steps):
            _dispatch_forward(unit, first)
    unit.save()
    return True


def deadline_passed(saga_id: UUID | str) -> bool:
    """A running saga is past its deadline: compensate it, unless it passed its pivot.

    Returns whether compensation began. Call inside the sweeper's transaction.
    """
    unit = lock(saga_id)
    if unit.saga.status not in (S.PENDING, S.RUNNING):
        return False
    if unit.passed_pivot():
        if not unit.saga.events.filter(kind=EventKind.DEADLINE_PASSED).exists():
            unit.event(EventKind.DEADLINE_PASSED, None, {"action": "continue past the pivot"})
            SagaEvent.objects.bulk_create(unit.events)
        return False
    if unit.saga.status == S.PENDING:
        unit.move_saga(S.RUNNING, None)
    unit.set_saga(error_code="deadline_passed", error_message="The saga ran past its deadline.")
    _begin_compensation(unit, EventKind.DEADLINE_PASSED, {"action": "compensate"})
    unit.save()
    return True


# -- operator actions -----------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What an operator action will do, shown before it is done."""

    action: str
    allowed: bool
    reason: str = ""
    run: tuple[str, ...] = ()
    undo: tuple[str, ...] = ()


def plan_retry(unit: Unit) -> Plan:
    if unit.saga.status != S.FAILED:
        return Plan(
            "retry", False, f"Only a failed saga can be retried (it is {unit.saga.status})."
        )
    if _in_compensation(unit):
        owed = [s.name for s in unit.owed_compensations()]
        return Plan("retry", True, "Resume the compensation.", undo=tuple(owed))
    first = _first_unfinished(unit)
    run = tuple(s.name for s in unit.steps[first:])
    return Plan("retry", True, "Resume from the failed step.", run=run)


def plan_compensate(unit: Unit) -> Plan:
    status = unit.saga.status
    if status not in (S.RUNNING, S.PENDING, S.FAILED) or _in_compensation(unit):
        return Plan("compensate", False, f"A {status} saga cannot be compensated.")
    owed = [s.name for s in unit.owed_compensations()]
    return Plan("compensate", True, "Abort and undo the completed steps.", undo=tuple(owed))


def plan_resolve(unit: Unit, index: int) -> Plan:
    if not 0 <= index < len(unit.steps):
        return Plan("resolve", False, "No such step.")
    step = unit.steps[index]
    if unit.saga.status != S.FAILED or step.status != T.COMPENSATION_FAILED:
        return Plan("resolve", False, "Only a step whose compensation failed can be resolved.")
    rest = [s.name for s in unit.owed_compensations() if s.index != index]
    return Plan("resolve", True, f"Mark {step.name} as compensated by hand.", undo=tuple(rest))


def _in_compensation(unit: Unit) -> bool:
    compensation_states = {T.COMPENSATING, T.COMPENSATED, T.COMPENSATION_FAILED}
    return any(s.status in compensation_states for s in unit.steps)


def _first_unfinished(unit: Unit) -> int:
    return next((s.index for s in unit.steps if s.status != T.COMPLETED), len(unit.steps))


def retry(saga_id: UUID | str, *, actor: str = "") -> Plan:
    """Resume a failed saga where it stopped, without re-running completed work."""
    with transaction.atomic():
        unit = lock(saga_id)
        plan = plan_retry(unit)
        if not plan.allowed:
            raise InvalidTransition(plan.reason)
        detail = {"actor": actor}
        unit.set_saga(recovery_attempts=0)  # an operator took over: recovery starts afresh
        if _in_compensation(unit):
            _begin_compensation(unit, EventKind.OPERATOR_RETRY, detail)
        else:
            first = _first_unfinished(unit)
            step = unit.steps[first]
            if step.status == T.FAILED:
                unit.move_step(step, T.PENDING, None, finished_at=None)
            unit.set_saga(current_step=first, error_code="", error_message="")
            unit.move_saga(S.RUNNING, EventKind.OPERATOR_RETRY, {**detail, "from": step.name})
            _dispatch_forward(unit, first)
        unit.save()
    return plan


def compensate(saga_id: UUID | str, *, actor: str = "") -> Plan:
    """Abort a running or failed saga and compensate its completed steps in reverse order."""
    with transaction.atomic():
        unit = lock(saga_id)
        plan = plan_compensate(unit)
        if not plan.allowed:
            raise InvalidTransition(plan.reason)
        if unit.saga.status == S.PENDING:
            unit.move_saga(S.RUNNING, None)
        unit.set_saga(recovery_attempts=0)
        _begin_compensation(unit, EventKind.OPERATOR_COMPENSATE, {"actor": actor})
        unit.save()
    return plan


def resolve(saga_id: UUID | str, index: int, *, actor: str = "") -> Plan:
    """Mark a step whose compensation failed as handled by hand; continue the compensation."""
    with transaction.atomic():
        unit = lock(saga_id)
        plan = plan_resolve(unit, index)
        if not plan.allowed:
            raise InvalidTransition(plan.reason)
        step = unit.steps[index]
        unit.move_step(
            step,
            T.COMPENSATED,
            EventKind.OPERATOR_RESOLVE,
            {"actor": actor},
            compensated_at=timezone.now(),
        )
        unit.set_saga(error_code="", error_message="", recovery_attempts=0)
        _begin_compensation(unit, EventKind.COMPENSATION_STARTED, {"actor": actor})
        unit.save()
    return plan


def plan(saga_id: UUID | str, action: str, index: int | None = None) -> Plan:
    """Preview an operator action without doing it."""
    with transaction.atomic():
        unit = lock(saga_id)
        if action == "retry":
            return plan_retry(unit)
        if action == "compensate":
            return plan_compensate(unit)
        if action == "resolve" and index is not None:
            return plan_resolve(unit, index)
    raise InvalidTransition(f"unknown action {action!r}")
