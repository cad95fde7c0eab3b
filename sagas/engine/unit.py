"""A unit of work: a locked saga with its steps, the one place where statuses change.

`lock()` locks the saga row and reads its step rows; `Unit` applies transitions, collects the
events and the messages to send, and writes the changed rows and the events in one statement
before the transaction commits. The messages go out after the commit (`sagas.engine.dispatch`), and
so do the events that signals, metrics or traces want (`sagas.engine.notify`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import cache
from typing import Any
from uuid import UUID

import psycopg
from celery.exceptions import SoftTimeLimitExceeded
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed
from django.db import DatabaseError, connection, transaction
from django.dispatch import receiver
from django.utils import timezone

from .. import conf
from ..definitions import RetryPolicy, StepContext, import_callable, is_child, is_group, is_wait
from ..exceptions import (
    BusinessError,
    CodeMissing,
    InvalidTransition,
    SagaBusy,
    StepError,
    TransientError,
)
from ..models import (
    Direction,
    EventKind,
    Saga,
    SagaMember,
    SagaSignal,
    SagaStatus,
    SagaStep,
    SignalStatus,
    StepStatus,
)
from . import dispatch, notify, rows
from .rows import EventRow, SagaRow, StepRow

logger = logging.getLogger("sagas")

# A row whose status the engine moves: a stage's, or a group's member's.
Moving = StepRow | SagaMember


SAGA_TRANSITIONS: dict[str, set[str]] = {
    SagaStatus.PENDING: {
        SagaStatus.RUNNING,
        SagaStatus.WAITING,
        SagaStatus.COMPENSATING,
        SagaStatus.COMPENSATED,
        SagaStatus.FAILED,
    },
    SagaStatus.RUNNING: {
        SagaStatus.WAITING,
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATING,
        SagaStatus.COMPENSATED,
        SagaStatus.FAILED,
    },
    SagaStatus.WAITING: {
        SagaStatus.RUNNING,
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATING,
        SagaStatus.COMPENSATED,
        SagaStatus.FAILED,
    },
    SagaStatus.COMPENSATING: {SagaStatus.COMPENSATED, SagaStatus.FAILED},
    # An operator marking the last stage as done completes a paused saga (`operator.skip`).
    SagaStatus.FAILED: {
        SagaStatus.RUNNING,
        SagaStatus.COMPLETED,
        SagaStatus.COMPENSATING,
        SagaStatus.COMPENSATED,
    },
    # A child saga, when its parent compensates (`sagas.engine.children`); no other saga.
    SagaStatus.COMPLETED: {SagaStatus.COMPENSATING},
    SagaStatus.COMPENSATED: set(),
}
FINAL = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)

STEP_TRANSITIONS: dict[str, set[str]] = {
    # A step in progress may be owed a compensation (`compensate_failed_step`) at any point.
    StepStatus.PENDING: {
        StepStatus.RUNNING,
        StepStatus.WAITING,
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.COMPENSATING,
    },
    # A wait ends with its event or its timeout, or, the saga turned back, before either (a
    # child stage, waiting for its child, is then owed: its child is compensated).
    StepStatus.WAITING: {
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.PENDING,
        StepStatus.COMPENSATING,
    },
    # (A group's member sent and never run goes back to pending when its group is settled.)
    StepStatus.RUNNING: {
        StepStatus.PENDING,
        StepStatus.RUNNING,
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.COMPENSATING,
    },
    StepStatus.COMPLETED: {StepStatus.COMPENSATING},
    # Retried, compensated, or marked as done by an operator (`operator.skip`).
    StepStatus.FAILED: {StepStatus.PENDING, StepStatus.COMPENSATING, StepStatus.COMPLETED},
    # A compensation that halts gives the steps it never reached back their status
    # (`Unit.halt_compensation`).
    StepStatus.COMPENSATING: {
        StepStatus.COMPENSATING,
        StepStatus.COMPENSATED,
        StepStatus.COMPENSATION_FAILED,
        StepStatus.COMPLETED,
        StepStatus.FAILED,
        StepStatus.PENDING,
    },
    StepStatus.COMPENSATION_FAILED: {StepStatus.COMPENSATING, StepStatus.COMPENSATED},
    StepStatus.COMPENSATED: set(),
}

# The error codes of a backward saga that stopped for an operator: why it stopped, not why it
# compensates (`Unit.remember_cause`).
STOP_CODES = frozenset({"compensation_failed", "recovery_exhausted"})
# Steps whose compensation is owed and not done: `compensating` ones wait for their turn.
OWED = {StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED}
IN_PROGRESS = {StepStatus.PENDING, StepStatus.RUNNING}


@dataclass(frozen=True)
class SafeError:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class StageNotBegun(Exception):
    """A group or a child stage could not begin (`Unit.stage_not_begun`), with the error its
    saga pauses with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.error = SafeError(code, message)


def safe_error(exc: BaseException, *, time_limit: int | None = None) -> SafeError:
    """A code and message fit to store and show: never a traceback or exception text."""
    if isinstance(exc, StepError | CodeMissing):
        return SafeError(exc.code, exc.message[:500])
    if isinstance(exc, SoftTimeLimitExceeded):
        return SafeError("time_limit", f"The step exceeded its time limit of {time_limit} s.")
    if failure := statement_failure(exc):
        return SafeError(failure, STATEMENT_FAILURES[sqlstate(exc) or ""][1])
    return SafeError("unexpected_error", f"Unexpected error ({type(exc).__name__}).")


def hard_time_limit_error(time_limit: int) -> SafeError:
    return SafeError(
        "time_limit",
        f"The step ignored its time limit of {time_limit} s and its process was stopped.",
    )


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def staff_detail(exc: BaseException, reference: str) -> dict[str, str]:
    """What staff see of an error besides its safe code and message, in the timeline: the
    exception's class and the reference under which the worker logged its traceback (for an
    error the step did not declare), and its message where the project says that is safe
    (`SAGAS_SHOWN_EXCEPTIONS`). API clients see none of it (`sagas.api`)."""
    if isinstance(exc, StepError | CodeMissing):
        return {}
    detail = {"exception": class_path(type(exc)), "reference": reference}
    if _shown(exc):
        detail["exception_message"] = str(exc)[:500]
    return detail


def _shown(exc: BaseException) -> bool:
    for path in conf.shown_exceptions():
        try:
            if isinstance(exc, _import(path)):
                return True
        except CodeMissing:
            continue
    return False


@cache
def _import(path: str) -> Any:
    """The callable at `path` (renamed by `SAGAS_RENAMED_CALLABLES`), imported once per
    process; `CodeMissing` if it does not import (not remembered: a retry imports again)."""
    return import_callable(path)


@receiver(setting_changed)
def _forget_imports(*, setting: str, **kwargs: Any) -> None:
    if setting == "SAGAS_RENAMED_CALLABLES":
        _import.cache_clear()


# A statement's own failure, by SQLSTATE: the attempt ran and failed (counted, and transient
# by default), unlike a connection lost (class 08, 57P01 to 57P03), which says nothing of the
# attempt: before its action began it is retried uncounted, after, counted as lost.
STATEMENT_FAILURES = {
    "57014": ("statement_timeout", "A statement of the attempt ran past its timeout."),
    "40P01": ("deadlock", "A statement of the attempt was chosen as a deadlock's victim."),
    "40001": ("serialization_failure", "The attempt's transaction could not be serialized."),
    "55P03": ("lock_not_available", "A statement of the attempt waited too long for a lock."),
}


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (Django's, wrapping psycopg's), if it has one."""
    seen: BaseException | None = exc
    while seen is not None:
        if code := getattr(seen, "sqlstate", None):
            return str(code)
        seen = seen.__cause__
    return None


def statement_failure(exc: BaseException) -> str | None:
    """The error code of a statement's own failure (`STATEMENT_FAILURES`), else None."""
    if not isinstance(exc, DatabaseError | psycopg.Error):  # Django's, or the action's own psycopg
        return None
    failure = STATEMENT_FAILURES.get(sqlstate(exc) or "")
    return failure[0] if failure else None


def is_transient(exc: BaseException, policy: RetryPolicy) -> bool:
    """Whether the policy retries `exc`. Raises `CodeMissing` when one of its transient
    classes no longer imports and `exc` is not a `BusinessError` (never retried)."""
    if isinstance(exc, TransientError | SoftTimeLimitExceeded) or statement_failure(exc):
        return True
    missing: CodeMissing | None = None
    for path in policy.transient:
        try:
            cls = _import(str(path))
        except CodeMissing as error:
            missing = missing or error
            continue
        if isinstance(exc, cls):
            return True
    if missing is not None and not isinstance(exc, BusinessError):
        raise missing  # a BusinessError is never retried: for the rest, nobody can tell
    return False


def unexpected_error_policy(step: Moving) -> str:
    """What an error the step did not declare does: its definition's, or the setting's (an
    invalid setting pauses: `sagas.E004` names it)."""
    policy = step.definition.get("on_unexpected_error")
    if policy:
        return str(policy)
    try:
        return conf.on_unexpected_error()
    except ImproperlyConfigured:
        logger.exception("sagas.E004: an unexpected error pauses its saga")
        return "pause"


def resolve(path: str) -> Any:
    """The callable stored as `path`, before an attempt runs anything: `CodeMissing` if a
    deploy removed it, so that nothing of the attempt runs (imported once per process)."""
    return _import(path)


def log_failure(
    unit: Unit, step: Moving, attempt: int, exc: BaseException, *, compensation: bool = False
) -> str:
    """Log a failed attempt for the developer reading the worker's log: one line for a declared
    error (a decline, a transient fault), the traceback for anything else (a bug in the step's
    code). Returns the reference that finds the record, which the timeline shows staff."""
    what = "compensation-" if compensation else ""
    reference = f"{unit.saga.pk}/{step.name}/{what}{attempt}"
    expected = isinstance(exc, StepError | CodeMissing | SoftTimeLimitExceeded)
    logger.warning(
        "saga %s step %s %sattempt %d failed: %s [%s]",
        unit.saga.pk,
        step.name,
        "compensation " if compensation else "",
        attempt,
        type(exc).__name__,
        reference,
        exc_info=None if expected else exc,
    )
    return reference


def policy_of(step: Moving, key: str) -> RetryPolicy:
    return rows.policy(step.definition, key)


def compensation_time_limit(step: Moving) -> int:
    return int(step.definition.get("compensation_time_limit") or step.definition["time_limit"])


@dataclass(frozen=True)
class Outcome:
    """What a task does next: continue the chain, stop it, retry, or fail it."""

    kind: str  # "done", "duplicate", "stop", "retry", "fail"
    countdown: float = 0.0
    error: SafeError | None = None


DONE, DUPLICATE, STOP = Outcome("done"), Outcome("duplicate"), Outcome("stop")
# What an attempt runs in when nothing traces it.
UNTRACED: AbstractContextManager[Any] = nullcontext()

# Whether this delivery began a step's action (or compensation): a database connection lost
# after that may have left the action's effects, and the attempt is counted (`sagas.tasks`).
ACTION_BEGAN: ContextVar[bool] = ContextVar("sagas_action_began", default=False)


# Events whose signal tells the saga's error: it is stored with them.
WITH_ERROR = frozenset({EventKind.SAGA_PAUSED, EventKind.SAGA_FAILED, EventKind.SAGA_COMPENSATED})


@dataclass
class Unit:
    """A locked saga with its steps, and the changes, events and messages to write with it."""

    saga: SagaRow
    steps: list[StepRow]
    events: list[EventRow] = field(default_factory=list)
    changed_steps: dict[int, set[str]] = field(default_factory=dict)
    saga_fields: set[str] = field(default_factory=set)
    after_commit: list[Callable[[], None]] = field(default_factory=list)
    # The members of the saga's groups by stage, read on first use (`members`).
    _members: dict[int, list[SagaMember]] | None = None
    changed_members: dict[int, tuple[SagaMember, set[str]]] = field(default_factory=dict)

    # -- transitions: the only code that changes a status --------------------------------

    def move_saga(self, to: str, kind: str | None, detail: dict[str, Any] | None = None) -> None:
        saga = self.saga
        if to != saga.status and to not in SAGA_TRANSITIONS[saga.status]:
            raise InvalidTransition(f"saga cannot go from {saga.status} to {to}")
        if saga.status == SagaStatus.COMPLETED and saga.parent_id is None:
            raise InvalidTransition("only a child saga leaves completed (its parent compensates)")
        if to == SagaStatus.RUNNING and saga.is_backward:
            raise InvalidTransition("a saga that began compensating never runs forward again")
        if to == SagaStatus.COMPENSATING:
            self.set_saga(direction=Direction.BACKWARD)
        final = to in (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
        self.set_saga(status=to, finished_at=timezone.now() if final else None)
        if final and any(is_wait(s.definition) for s in self.steps):
            self._discard_kept_signals()
        if kind in WITH_ERROR:
            # The saga's error as it is now, for the signal sent later from this event (the
            # relay's), by when the saga may have moved on.
            detail = {**(detail or {}), "error_code": saga.error_code}
            detail["error_message"] = saga.error_message
        if kind:
            self.event(kind, None, detail)
        if saga.parent_id is not None and to in (*FINAL, SagaStatus.FAILED):
            # A child ended, or stopped: its parent is told once this commits (never locked
            # from here: a parent locks its child, not the other way round).
            parent, stage = str(saga.parent_id), int(saga.parent_stage or 0)
            member = saga.parent_member
            self.after_commit.append(lambda: dispatch.send_child_ended(parent, stage, member))

    def _discard_kept_signals(self) -> None:
        """The saga is finished: the signals kept for waits it never reached are discarded,
        on its timeline."""
        kept = list(
            SagaSignal.objects.filter(saga_id=self.saga.pk, status=SignalStatus.KEPT).values_list(
                "pk", "event"
            )
        )
        if not kept:
            return
        SagaSignal.objects.filter(pk__in=[pk for pk, _ in kept]).update(
            status=SignalStatus.DISCARDED
        )
        for pk, event in kept:
            self.event(EventKind.SIGNAL_DISCARDED, None, {"signal": pk, "event": event})

    def move_step(
        self,
        step: Moving,
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
        if isinstance(step, SagaMember):
            self.changed_members.setdefault(step.pk, (step, set()))[1].update({"status", *values})
        else:
            self.changed_steps.setdefault(step.index, set()).update({"status", *values})
        if kind:
            self.event(kind, step, detail)

    def attempt_completed(self, step: Moving, attempt: int, output: Any, started: Any) -> None:
        """Record an attempt of a step's (or a member's) action that completed it."""
        finished = timezone.now()
        self.move_step(
            step,
            StepStatus.COMPLETED,
            EventKind.STEP_COMPLETED,
            {
                "attempt": attempt,
                "duration_ms": int((finished - started).total_seconds() * 1000),
                "worker": worker_name(),
            },
            output=output,
            attempts=attempt,
            started_at=started,
            finished_at=finished,
            error_code="",
            error_message="",
        )
        self.progressed()

    def stage_not_begun(self, stage: StepRow, error: SafeError) -> None:
        """A group or a child stage could not begin (its items, its child's input or
        definition): it fails, and the saga pauses for an operator, whose retry begins it
        again."""
        now = timezone.now()
        self.move_step(
            stage,
            StepStatus.FAILED,
            EventKind.STEP_FAILED,
            error.as_dict(),
            started_at=stage.started_at or now,
            finished_at=now,
            error_code=error.code,
            error_message=error.message,
        )
        self.set_saga(error_code=error.code, error_message=error.message)
        self.move_saga(
            SagaStatus.FAILED, EventKind.SAGA_PAUSED, {"step": stage.name, "reason": error.code}
        )

    def set_saga(self, **values: Any) -> None:
        for name, value in values.items():
            setattr(self.saga, name, value)
        self.saga_fields.update(values)

    def progressed(self) -> None:
        """A step or a compensation got done: the sweeper's count of stalls starts again."""
        if self.saga.recovery_attempts:
            self.set_saga(recovery_attempts=0)

    def event(self, kind: str, step: Moving | None, detail: dict[str, Any] | None) -> None:
        name = step.name if step else ""
        if isinstance(step, SagaMember):  # on its group's stage, named `<group>.<member>`
            name, detail = step.label, {**(detail or {}), "member": step.name}
        self.events.append(
            EventRow(
                self.saga.pk,
                step.index if step else None,
                name,
                kind,
                detail or {},
                timezone.now(),
            )
        )

    def attempt(self, step: Moving, *, compensation: bool = False) -> AbstractContextManager[Any]:
        """What an attempt of the step's action (or compensation) runs in: its span, when
        traces are on (`sagas.tracing`), which ends once the attempt's outcome commits."""
        ACTION_BEGAN.set(True)
        tracer = notify.tracer
        if tracer is None:
            return UNTRACED
        return tracer.attempt(self.saga, step, compensation=compensation)

    # -- messages ----------------------------------------------------------------------------

    def is_current(self, epoch: int) -> bool:
        """Whether a message of `epoch` belongs to the saga's latest chain.

        A step's (or a compensation's) message of an older chain still does its work if the
        rows say it is due: the sweeper may have sent a newer chain while the older one was
        only waiting in a long queue, and starving both would stall the saga. It only stops
        where the work is done, leaving the newer chain to carry on. An error callback of an
        older chain does nothing.
        """
        return epoch == self.saga.epoch

    def _next_epoch(self) -> int:
        self.set_saga(epoch=self.saga.epoch + 1)
        return self.saga.epoch

    def send_forward(self, start: int, *, countdown: float = 0.0) -> None:
        """Send the steps from step `start` on, up to the next stage that is not a step, as a
        new chain after the commit (to go on from a stage that may be a wait: `go_on`)."""
        assert not self.stops_at(start), "a chain begins with a step"
        saga_id, epoch = str(self.saga.pk), self._next_epoch()
        steps = chain_of(self.steps, start)
        self.after_commit.append(lambda: dispatch.send_steps(saga_id, epoch, steps, countdown))

    def send_compensations(self, *, countdown: float = 0.0) -> None:
        """Send the compensations still to run, in reverse order, as a new chain; or, when
        the next are the members of a group that compensates concurrently, each of those as a
        message of its own (the last to end sends the rest)."""
        owed = self.to_compensate()
        together = self.compensating_together(owed)
        if together:
            # Not those whose compensation runs now (it holds its member's row, and records
            # its outcome): a message for one would only wait for that row, holding a worker.
            free = free_members(together)
            together = [m for m in together if m.pk in free]
            if not together:
                return
        saga_id, epoch = str(self.saga.pk), self._next_epoch()
        steps: list[dispatch.Entry] = [
            (s.index, compensation_time_limit(s), getattr(s, "position", None))
            for s in (together or owed)
        ]
        if together:
            self.after_commit.append(
                lambda: dispatch.send_member_compensations(saga_id, epoch, steps, countdown)
            )
        elif steps:
            self.after_commit.append(
                lambda: dispatch.send_compensations(saga_id, epoch, steps, countdown)
            )

    def compensating_together(self, owed: Sequence[Any] | None = None) -> list[SagaMember]:
        """The members whose compensations run now at the same time: those still owed of the
        group at the head of what is owed, if it compensates concurrently (else none)."""
        owed = self.to_compensate() if owed is None else owed
        head = owed[0] if owed else None
        if not isinstance(head, SagaMember) or not compensates_concurrently(self.steps[head.index]):
            return []
        return [m for m in owed if isinstance(m, SagaMember) and m.index == head.index]

    # -- writing -----------------------------------------------------------------------------

    def save(self, *, commit: bool = False) -> None:
        """Write the changed rows and the events in one statement.

        With `commit`, and when this is the outermost transaction, the COMMIT goes with it:
        write and commit in one round trip (psycopg's pipeline mode). The transaction's
        `atomic()` block then finds nothing left to commit; it must end right after this.
        """
        # Always touch the saga: updated_at is how the sweeper sees progress.
        self.saga.updated_at = timezone.now()
        writes = [rows.update_sql(self.saga, self.saga_fields | {"updated_at"})]
        writes += [rows.update_sql(self.steps[i], f) for i, f in self.changed_steps.items()]
        writes += [rows.update_sql(m, f) for m, f in self.changed_members.values()]
        for send in self.after_commit:
            transaction.on_commit(publish_or_leave_to_sweeper(self.saga.pk, send))
        self._write_events(writes, commit=commit)

    def save_events(self) -> None:
        """Write only the events (a duplicate delivery changes nothing else)."""
        self._write_events([], commit=False)

    def _write_events(self, writes: list[rows.Sql], *, commit: bool) -> None:
        """Run `writes` and insert the events, in one statement, and tell of the events after
        the commit. If a signal's receiver wants one of them, a notice of them is written too
        (`sagas.models.SagaNotice`), for the relay to send them if this process never does."""
        events = self.events
        notice_for = self.saga.pk if notify.signalled(events) else None
        written = rows.execute_as_one(
            [*writes, rows.insert_events_sql(events)], commit=commit, notice_for=notice_for
        )
        if written:
            ids, notices = zip(*written, strict=True)
            notify.on_commit(self.saga, events, ids=ids, notice=notices[0])
        else:
            notify.on_commit(self.saga, events)

    # -- reading ---------------------------------------------------------------------------

    def outputs_before(self, index: int) -> dict[str, Any]:
        """The outputs of the steps before `index`: every one of them completed, since steps
        run in order, whatever has become of them since (compensated, or owed)."""
        return {s.name: s.output for s in self.steps[:index]}

    def context(self, step: Moving, *, compensation: bool = False) -> StepContext:
        """What the step's action (or its compensation) receives; attempts count from the rows."""
        attempts = step.compensation_attempts if compensation else step.attempts
        if isinstance(step, SagaMember):
            return StepContext(
                saga_id=self.saga.pk,
                step=step.name,
                input=self.saga.input,
                outputs=self.outputs_before(step.index),
                attempt=attempts + 1,
                output=step.output,
                item=step.item,
                group=step.group,
            )
        return StepContext(
            saga_id=self.saga.pk,
            step=step.name,
            input=self.saga.input,
            outputs=self.outputs_before(step.index),
            attempt=attempts + 1,
            output=step.output,
        )

    def in_progress(self) -> StepRow | None:
        """The first step that has not completed, while the saga goes forward."""
        if self.saga.is_backward:
            return None
        return next((s for s in self.steps if s.status != StepStatus.COMPLETED), None)

    def stops_at(self, index: int) -> bool:
        """Whether a chain ends before stage `index`: a wait, a group or a child (any stage
        but a step)."""
        return "kind" in self.steps[index].definition

    def members(self, index: int) -> list[SagaMember]:
        """The members of the group at stage `index`, in order (none before it began); the
        saga's groups' members are read in one query, on first use (unless read with the
        saga: `lock_with_members`)."""
        if self._members is None:
            found: Iterable[SagaMember] = ()
            if self.has_groups():
                found = SagaMember.objects.filter(saga_id=self.saga.pk).order_by(
                    "stage", "position"
                )
            self.read_members(found)
        assert self._members is not None
        return self._members.get(index, [])

    def read_members(self, members: Iterable[SagaMember]) -> None:
        """Take the saga's members as read, by group then position."""
        self._members = {}
        for member in members:
            attach(member, self.steps[member.stage])
            self._members.setdefault(member.stage, []).append(member)

    def members_in_flight(self, index: int) -> set[int]:
        """The ids of the group's running members whose attempt runs now: their rows are held
        (an attempt holds its member's row). Asked with SKIP LOCKED: never waiting for one."""
        running = [m for m in self.members(index) if m.status == StepStatus.RUNNING]
        return {m.pk for m in running} - free_members(running)

    def member(self, index: int, position: int) -> SagaMember | None:
        return next((m for m in self.members(index) if m.position == position), None)

    def go_on(self, index: int) -> None:
        """Go on from stage `index`: begin the wait or the group, or send the steps from it as
        a new chain."""
        stage = self.steps[index]
        begin = BEGIN_STAGE.get(str(stage.definition.get("kind", "")))
        if begin is not None:
            begin(self, stage)
        else:
            self.send_forward(index)

    def has_groups(self) -> bool:
        return any(is_group(s.definition) for s in self.steps)

    def to_compensate(self) -> list[Any]:
        """Steps whose compensation is owed and not yet failed, in the order to run them. A
        group's stage stands first for its members until they are settled (its running
        members finished: `sagas.engine.groups.settle`), then its owed members, last first."""
        owed: list[Any] = []
        for stage in sorted(self.steps, key=lambda s: s.index, reverse=True):
            if stage.status != StepStatus.COMPENSATING:
                continue
            if not is_group(stage.definition) or not stage.compensation_attempts:
                owed.append(stage)
            else:
                members = self.members(stage.index)
                owed += [m for m in reversed(members) if m.status == StepStatus.COMPENSATING]
        return owed

    def owed_on_compensation(self) -> list[StepRow]:
        """What compensating now would undo, in reverse order: every completed step, those
        whose compensation is owed or failed, and the step in progress when its definition
        says `compensate_failed_step` (it may have started, whatever its row says)."""
        owed = [s for s in self._undoable() if s.status in (StepStatus.COMPLETED, *OWED)]
        current = self.in_progress()
        if current is not None and current.definition.get("compensate_failed_step"):
            owed.append(current)
        elif current is not None and is_group(current.definition) and self.members(current.index):
            owed.append(current)  # a group that began: its members are settled, then undone
        elif (
            current is not None
            and current.status == StepStatus.WAITING
            and current.definition.get("kind") == "child"
        ):
            owed.append(current)  # its child is in flight: it is compensated (aborted)
        return sorted(owed, key=lambda s: s.index, reverse=True)

    def run_names(self, stages: Sequence[StepRow]) -> tuple[str, ...]:
        """The names of what going on with `stages` runs, for a plan: a group that began runs
        its members that did not complete (`<group>.<member>`)."""
        names: list[str] = []
        for stage in stages:
            members = self.members(stage.index) if is_group(stage.definition) else []
            if stage.status == StepStatus.COMPLETED or not members:
                names.append(stage.name)
            else:
                names += [m.title for m in members if m.status != StepStatus.COMPLETED]
        return tuple(names)

    def undo_names(self, stages: Sequence[StepRow]) -> tuple[str, ...]:
        """The names of what compensating `stages` undoes, for a plan: a group's members that
        completed (or may have, being in progress), `<group>.<member>`, last first."""
        names: list[str] = []
        for stage in stages:
            if not is_group(stage.definition):
                names.append(stage.name)
                continue
            running = self.saga.status in (SagaStatus.PENDING, SagaStatus.RUNNING)
            in_flight = self.members_in_flight(stage.index)
            for member in reversed(self.members(stage.index)):
                undo_failed = member.definition.get("compensate_failed_step")
                sent = member.status == StepStatus.RUNNING
                if (
                    member.status in (StepStatus.COMPLETED, *OWED)
                    or (undo_failed and (sent or member.status == StepStatus.FAILED))
                    or (sent and is_child(member.definition))  # its child, aborted, is undone
                ):
                    names.append(member.title)  # as the group's settling will find it owed
                elif sent and (running or member.pk in in_flight):
                    # Sent to a worker: undone if it completes before the settling. A paused
                    # saga's members sent and not run never run, but one whose attempt runs
                    # now (its row held) may complete.
                    names.append(f"{member.title} (if it completes)")
        return tuple(names)

    def owed_on_resume(self) -> list[StepRow]:
        """What resuming a backward saga's compensation would undo, in reverse order: the steps
        owed or whose compensation failed, and those a halted compensation never reached
        (completed ones, and a failed step its definition says to compensate)."""
        owed = [s for s in self._undoable() if s.status in (StepStatus.COMPLETED, *OWED)]
        # The step that was in progress when compensation began (the first that never
        # completed), not undone yet: owed where its definition says it may have half-happened.
        completed = rows.completed_steps(self.saga.pk)
        current = next(
            (
                s
                for s in self.steps
                if s.index not in completed
                # A wait that completed: its events are not a step's (`WAIT_COMPLETED`).
                and not (is_wait(s.definition) and s.status == StepStatus.COMPLETED)
            ),
            None,
        )
        if (
            current is not None
            and current.status in (StepStatus.PENDING, StepStatus.RUNNING, StepStatus.FAILED)
            and current.definition.get("compensate_failed_step")
        ):
            owed.append(current)
        elif (
            current is not None
            and current.status in (StepStatus.RUNNING, StepStatus.FAILED)
            and is_group(current.definition)
            and self.members(current.index)
        ):
            owed.append(current)  # a group that began: its members are settled, then undone
        elif (
            current is not None
            and current.status in (StepStatus.PENDING, StepStatus.FAILED)
            and current.definition.get("kind") == "child"
            and Saga.objects.filter(parent_id=self.saga.pk, parent_stage=current.index).exists()
        ):
            owed.append(current)  # its child, aborted or failed, is compensated
        return sorted(owed, key=lambda s: s.index, reverse=True)

    def _undoable(self) -> list[StepRow]:
        """The stages that have something to undo: steps (a wait has nothing)."""
        return [s for s in self.steps if not is_wait(s.definition)]

    def halt_compensation(self) -> None:
        """The compensation stops for an operator: the steps it never reached get back the
        status they had (completed, or failed for a step that never completed), with no
        error of a compensation attempt, so that the saga shows what was undone and what
        was not. Resuming it (`owed_on_resume`) marks them owed again."""
        # A compensation tried once is under way: it stays owed, with its error.
        waiting = [
            s
            for s in self.steps
            if s.status == StepStatus.COMPENSATING and not s.compensation_attempts
        ]
        if not waiting:
            return
        completed = rows.completed_steps(self.saga.pk)
        for step in waiting:
            if step.index in completed:
                self.move_step(step, StepStatus.COMPLETED, None)
            elif not step.attempts and step.started_at is None:
                self.move_step(step, StepStatus.PENDING, None)  # aborted before it ever ran
            else:
                self.move_step(step, StepStatus.FAILED, None)

    def remember_cause(self, detail: dict[str, Any]) -> dict[str, Any]:
        """`detail` of the event by which a backward saga stops, with why it was compensating
        (its error code and message), which a retry restores (`restore_cause`)."""
        if self.saga.is_backward and self.saga.error_code not in STOP_CODES:
            detail = {
                **detail,
                "cause": {"code": self.saga.error_code, "message": self.saga.error_message},
            }
        return detail

    def restore_cause(self) -> None:
        """A backward saga resumes its compensation: its error is again why it compensates
        (the failed step's, `deadline_passed`, or none for an operator's abort), not why it
        stopped."""
        cause = rows.last_cause(self.saga.pk)
        if cause is not None:
            self.set_saga(error_code=cause["code"], error_message=cause["message"])

    def passed_pivot(self) -> bool:
        return any(
            s.definition.get("pivot") and s.status == StepStatus.COMPLETED for s in self.steps
        )


# What begins a stage that ends a chain, by its kind ("wait", "group"): registered by the
# modules of those stages (`sagas.engine.waits`, `sagas.engine.groups`), which import this one.
BEGIN_STAGE: dict[str, Callable[[Unit, Any], None]] = {}
# What compensates a stage that undoes itself another way than by a compensation of its own,
# by its kind ("child": its saga is compensated): registered by its module.
COMPENSATE_STAGE: dict[str, Callable[[Unit, Any], Outcome]] = {}
# What a stage in progress does at once when its saga turns back, by its kind ("child": its
# child in flight is aborted): registered by its module.
TURN_BACK_STAGE: dict[str, Callable[[Unit, Any], None]] = {}
# The same for a group's member that is not a step, by its kind ("child": a group's child
# member), under the saga's lock: what begins it (it runs no task: its child saga is started,
# and returned; raises `StageNotBegun`), its compensation, and what its group's settling does
# at once to one in flight (registered by `sagas.engine.children`).
START_MEMBER: dict[str, Callable[[Unit, Any], Any]] = {}
COMPENSATE_MEMBER: dict[str, Callable[[Unit, Any], Outcome]] = {}
TURN_BACK_MEMBER: dict[str, Callable[[Unit, Any], None]] = {}


def lock_member(
    saga_id: UUID | str, index: int, position: int, *, bound: float | None = None
) -> SagaMember | None:
    """Lock a member's row (waiting for another delivery of the same member to end). An
    attempt of a member's action or compensation holds it while it runs, and takes the saga's
    lock after it: whoever holds the saga's lock must not wait for a member's row (SKIP
    LOCKED), and whoever means to change a member's row takes it first. With `bound` (an
    attempt's hard time limit), the session's timeouts are set as `lock` sets them."""
    row = (
        SagaMember.objects.select_for_update(no_key=True, of=("self",))
        .filter(saga_id=saga_id, stage=index, position=position)
        .order_by()  # no join of the saga, whose row this must not lock
        .first()
    )
    if row is not None and bound is not None:
        with connection.cursor() as cursor:
            cursor.execute(rows.read.SESSION_BOUNDS_SQL, rows.read.session_bounds(bound))
    return row


def free_members(members: Sequence[SagaMember]) -> set[int]:
    """The ids of those of `members` whose rows no one else holds, now locked by this
    transaction (SKIP LOCKED: never waiting, under the saga's lock, for a member's attempt,
    which may wait for the saga's lock next)."""
    if not members:
        return set()
    return set(
        SagaMember.objects.select_for_update(no_key=True, skip_locked=True, of=("self",))
        .filter(pk__in=[m.pk for m in members])
        .order_by()
        .values_list("pk", flat=True)
    )


def claim_members(members: Sequence[SagaMember]) -> None:
    """Lock the rows of `members` an operator's action changes, under the saga's lock, without
    waiting (`free_members`): a late message of a member (an attempt, its error callback)
    holds its row and takes the saga's lock next, so waiting for it could deadlock. One held:
    the saga is busy (`SagaBusy`), and the action changes nothing."""
    free = free_members(members)
    held = [m for m in members if m.pk not in free]
    if held:
        name = getattr(held[0], "label", held[0].name)
        raise SagaBusy(f"A message of {name} is being handled; try again in a moment.")


def compensates_concurrently(stage: Any) -> bool:
    """Whether the members of the group at `stage` (a row) are compensated at the same time."""
    return bool(stage.definition.get("concurrent_compensation"))


def attach(member: SagaMember, stage: Any) -> SagaMember:
    """A member's row as the engine reads it: its definition (from its group's stage) and its
    group's name beside its columns."""
    definition = stage.definition
    member.definition = (
        definition["map"]["step"] if "map" in definition else definition["members"][member.position]
    )
    member.group = stage.name
    return member


def worker_name() -> str:
    """Which process ran a step: shown in the timeline, to tell workers apart."""
    return f"{socket.gethostname()}:{os.getpid()}"


def chain_of(steps: Sequence[StepRow | SagaStep], start: int) -> list[tuple[int, int]]:
    """The (index, time limit) of the steps a chain from `start` runs: up to the next wait,
    group or child (whatever a wait's condition says: a wait skipped sends the rest as a new
    chain, as many broker messages as a longer chain, and no message of an older chain is
    left to race it).
    `steps`: the rows as read (`StepRow`) or as a start makes them (`SagaStep`)."""
    chain = []
    for step in steps[start:]:
        if "kind" in step.definition:  # a wait, a group or a child: not a step
            break
        chain.append((step.index, int(step.definition["time_limit"])))
    return chain


def publish_or_leave_to_sweeper(saga_id: Any, send: Callable[[], None]) -> Callable[[], None]:
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


def lock(saga_id: UUID | str, *, wait: float | None = None, bound: float | None = None) -> Unit:
    """Lock the saga row, then read its steps. Call inside a transaction.

    The lock is `FOR NO KEY UPDATE`: it excludes every other locker of the saga, but not an
    insert of a row that references it (a signal kept while a step runs).

    Two statements on purpose: a `FOR UPDATE OF saga` joined with the steps would, after
    waiting for the lock, re-check only the saga row and return the step rows as they were
    before the wait. Read after the lock, in a statement of its own (READ COMMITTED takes a new
    snapshot for each), the steps are current: every writer of a step holds its saga's lock.
    Both go to the server together, in one round trip (psycopg's pipeline mode); the server
    still runs them one after the other.

    With `wait` (seconds), give up with `SagaBusy` rather than wait longer for the lock: an
    operator's request must not hang behind a step that is still running.

    With `bound` (seconds: an attempt's hard time limit), bound the rest of the transaction's
    session in PostgreSQL, so that nothing of the attempt outlives its kill and keeps the saga
    locked (`rows.read_locked`), in the same round trip.
    """
    saga, steps = rows.read_locked(saga_id, wait=wait, bound=bound)
    return Unit(saga=saga, steps=steps)


def lock_with_members(saga_id: UUID | str, *, bound: float | None = None) -> Unit:
    """`lock`, with the saga's group members read in the same round trip (to record a
    member's outcome)."""
    saga, steps, members = rows.read_locked_with_members(saga_id, bound=bound)
    unit = Unit(saga=saga, steps=steps)
    unit.read_members(members)
    return unit


def peek_at_member(
    saga_id: UUID | str, index: int, position: int, *, bound: float | None = None
) -> tuple[SagaMember | None, Unit]:
    """A member's row locked (`lock_member`), and its saga and steps as they are (`peek`), in
    one round trip: an attempt of the member begins so."""
    member, saga, steps = rows.read_member_locked(saga_id, index, position, bound=bound)
    return member, Unit(saga=saga, steps=steps)


def peek(saga_id: UUID | str) -> Unit:
    """The saga and its steps as they are, without the lock: for a preview that must not wait
    for a running step. Call inside a transaction; change nothing through it. What it shows
    may be out of date by the time an action locks the saga, whose plan has the last word."""
    saga, steps = rows.read_locked(saga_id, wait=None, lock=False)
    return Unit(saga=saga, steps=steps)
