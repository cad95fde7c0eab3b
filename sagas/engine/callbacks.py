"""The chains' error callbacks: safe to lose, to repeat and to delay.

Celery calls a chain's error callback when one of its tasks fails: normally a step whose
attempt already recorded its final failure and what the saga does next, so the callback only
sends the compensations that decision began. It also comes when a hard time limit killed an
attempt before it could record anything; then the callback records that attempt, as the
attempt itself would have. And it comes when an attempt committed but its task could not send
the chain's next message (the broker refused it): the failed task's id names its step
(`dispatch.task_id`), already done, so the callback sends the rest of the chain again.

The callback is told the class of the failed task's exception (`cause`): a hard time limit
(`TimeLimitExceeded`), the worker process lost (`WorkerLostError`: only where Celery does not
deliver its message again), or anything else that made the task fail outside the attempt it
records itself (a message a deploy made invalid, the engine's own error). Each is recorded as
what it is, never one as another.

Each callback carries the epoch of its chain. The first one to act sends a new chain and so
raises the saga's epoch: a repeated or late callback finds a newer epoch and does nothing. A
lost one is made up for by the sweeper, which finds the saga stalled and sends the same.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from django.db import transaction

from ..models import EventKind, SagaEvent
from . import dispatch, groups, rows
from .compensation import finish_if_done, its_turn, record_compensation_failure
from .forward import attempt_may_fail, record_attempt_failure, record_unexpected_failure
from .relay import relay_saga
from .unit import (
    IN_PROGRESS,
    Outcome,
    SafeError,
    SagaStatus,
    StepStatus,
    Unit,
    compensation_time_limit,
    hard_time_limit_error,
    lock,
    lock_member,
    unexpected_error_policy,
)

logger = logging.getLogger("sagas")


# Exceptions by which the broker, not the step, failed a task: a message it refused (the
# retry's, the chain's next one), which Celery's `Task.retry` turns into `Reject`.
BROKER_MODULES = ("kombu.", "amqp.", "redis.", "celery.exceptions.Reject")


def broker_failed(cause: str | None) -> bool:
    return bool(cause) and str(cause).startswith(BROKER_MODULES)


def outside_attempt_error(cause: str | None, task_id: str, time_limit: int) -> SafeError:
    """What a failed task's exception says of an attempt that recorded nothing."""
    name = (cause or "").rsplit(".", 1)[-1]
    if name == "TimeLimitExceeded":
        return hard_time_limit_error(time_limit)
    if name == "WorkerLostError":
        return SafeError("worker_lost", "The step's worker process ended during its attempt.")
    return SafeError(
        "task_failed",
        f"The step's task failed outside its attempt ({name or 'no exception named'}); the "
        f"worker's log has its traceback under task {task_id}.",
    )


def step_chain_failed(
    saga_id: str,
    epoch: int,
    *,
    failed: int | None = None,
    cause: str | None = None,
    task_id: str = "",
) -> None:
    """Error callback of a saga's forward chain; `failed` is the index of the step whose task
    failed, where its task id tells, and `cause` the class of its exception. Idempotent. A
    group's member's task has one of its own (`groups.member_chain_failed`)."""
    member = dispatch.failed_member(task_id, saga_id, epoch)
    if member is not None:
        member_chain_failed(saga_id, epoch, *member, cause=cause, task_id=task_id)
        return
    with transaction.atomic():
        unit = lock(saga_id)
        saga = unit.saga
        if not unit.is_current(epoch):
            logger.info("saga %s: error callback of an older chain, ignored", saga_id)
            return
        if saga.status == SagaStatus.COMPENSATING:
            unit.send_compensations()  # the failed attempt began the compensation
        elif saga.status in (SagaStatus.PENDING, SagaStatus.RUNNING) and (
            step := unit.in_progress()
        ):
            if (failed is not None and failed < step.index) or broker_failed(cause):
                # That step committed, or the step's retry was recorded; then its task failed
                # to send the next message (the broker refused it): send it again, nothing
                # failed.
                unit.send_forward(step.index)
            elif step.status not in IN_PROGRESS:
                return
            else:
                error = outside_attempt_error(cause, task_id, step.definition["time_limit"])
                if error.code == "task_failed":  # not the step's doing: as a bug is treated
                    detail = {"exception": cause or "", "reference": task_id}
                    outcome = record_unexpected_failure(
                        unit, step, error, detail=detail, reason="task failed"
                    )
                else:
                    outcome = record_attempt_failure(unit, step, error, transient=True)
                _carry_on(unit, outcome.kind, outcome.countdown, forward_from=step.index)
        else:
            return
        unit.save()


def compensation_chain_failed(
    saga_id: str,
    epoch: int,
    *,
    failed: int | None = None,
    cause: str | None = None,
    task_id: str = "",
) -> None:
    """Error callback of a saga's compensation chain; `failed` and `cause` as above.
    Idempotent."""
    member = dispatch.failed_member(task_id, saga_id, epoch)
    with transaction.atomic():
        if member is not None:
            lock_member(saga_id, *member)  # before the saga's: see `lock_member`
        unit = lock(saga_id)
        if not unit.is_current(epoch) or unit.saga.status != SagaStatus.COMPENSATING:
            logger.info("saga %s: compensation error callback with nothing to do", saga_id)
            return
        remaining = unit.to_compensate()
        failed_key = member or ((failed, None) if failed is not None else None)
        owed = {(s.index, getattr(s, "position", None)) for s in remaining}
        if not remaining:
            finish_if_done(unit)
        elif (failed_key is not None and failed_key not in owed) or broker_failed(cause):
            # That compensation committed (or its retry was recorded); then its task failed to
            # send the next message: send the rest again, nothing failed.
            unit.send_compensations()
        elif "kind" in remaining[0].definition:
            # A group's settling or a child's compensation: nothing of its own to count (it
            # runs no compensation); it is tried again.
            unit.send_compensations(countdown=1.0)
        else:
            # The compensation in progress recorded nothing: its task failed outside it (a
            # member's of a group compensating concurrently: the one whose task it was).
            step = next(
                (s for s in remaining if (s.index, getattr(s, "position", None)) == failed_key),
                remaining[0],
            )
            error = outside_attempt_error(cause, task_id, compensation_time_limit(step))
            outcome = record_compensation_failure(unit, step, error)
            if unit.saga.status == SagaStatus.COMPENSATING:
                unit.send_compensations(countdown=outcome.countdown)
        unit.save()


# An attempt that may have run and recorded nothing, by what tells of it.
LOST = {
    "redelivered": SafeError(
        "worker_lost",
        "The attempt's worker process ended before it recorded an outcome (killed, out of "
        "memory, or crashed); its message came back.",
    ),
    "connection_lost": SafeError(
        "connection_lost",
        "The attempt's database session ended while its action ran; it may have had effects.",
    ),
}


def attempt_lost(
    saga_id: str, index: int, *, forward: bool, why: str, member: int | None = None
) -> Outcome | None:
    """Count, in a transaction of its own, an attempt of the step (or of its compensation)
    that may have run and recorded nothing: its message arrived redelivered (its worker died
    before it committed), or its database session ended after its action began (`why`, a key
    of `LOST`). It is a transient failure of the step: retried while its policy allows, else
    the step fails for good. None when the step is not in progress (nothing to count)."""
    error = LOST[why]
    if forward and member is not None:
        return groups.member_lost(saga_id, index, member, error, why)
    with transaction.atomic():
        if member is not None:
            lock_member(saga_id, index, member)  # before the saga's: see `lock_member`
        unit = lock(saga_id)
        step: Any = unit.steps[index]
        if member is not None:
            step = unit.member(index, member)
            if step is None:
                return None
        detail = {"delivery": why}
        if forward:
            if not attempt_may_fail(unit, step) or step.status not in IN_PROGRESS:
                return None
            outcome = record_attempt_failure(unit, step, error, transient=True, detail=detail)
        else:
            if not its_turn(unit, step) or "kind" in step.definition:
                return None  # not its turn, or a group's or child's: nothing to count
            if step.fenced_until is not None and step.fenced_until > rows.database_now():
                return None  # waiting for its fence: no attempt of it can have started
            outcome = record_compensation_failure(unit, step, error, detail=detail)
        unit.save()
    logger.warning(
        "saga %s: %s of step %s counted as lost (%s)",
        saga_id,
        "an attempt" if forward else "a compensation attempt",
        step.name,
        why,
    )
    return outcome


def after_unsure_commit(
    saga_id: str, index: int, *, forward: bool, since: float | None, member: int | None = None
) -> SafeError | None:
    """A previous delivery of this message may have committed a transition unheard: it lost
    its database connection (`since`: when it began, on its worker's clock), as when
    PostgreSQL restarts between a COMMIT and its answer; or its process died (the message
    came back redelivered, `since` None), maybe between its COMMIT and the callbacks after
    it. Then the signals that commit owed were never sent: the relay sends the saga's unsent
    ones now (at least once). Returns a step's error if it failed for good (since `since`),
    so that the task ends the chain with it and the chain's error callback, which that
    delivery never sent, is sent: harmless if it was (the first one to act raises the
    saga's epoch). None for a compensation (see below)."""
    with transaction.atomic():
        unit = lock(saga_id)
        since_then = since is None or (
            SagaEvent.objects.filter(
                saga_id=unit.saga.id, created_at__gte=datetime.fromtimestamp(since, tz=UTC)
            )
            .exclude(kind=EventKind.DUPLICATE_IGNORED)
            .exists()
        )
        step: Any = unit.steps[index]
        if member is not None:
            step = unit.member(index, member)
    relay_saga(saga_id)
    # Only a step's failure ends its chain for its error callback to act: a compensation's
    # final failure halts the saga itself (its callback then has nothing to do), or, with
    # `continue_compensation_on_failure`, carries on in the same chain, which a callback
    # sent now would fork.
    if forward and since_then and step is not None and step.status == StepStatus.FAILED:
        return SafeError(step.error_code, step.error_message)
    return None


def _carry_on(unit: Unit, outcome: str, countdown: float, *, forward_from: int) -> None:
    """What the chain would have done after the attempt: retry it, or compensate."""
    if outcome == "retry":
        unit.send_forward(forward_from, countdown=countdown)
    elif unit.saga.status == SagaStatus.COMPENSATING:
        unit.send_compensations()


def member_chain_failed(
    saga_id: str, epoch: int, index: int, position: int, *, cause: str | None, task_id: str
) -> None:
    """Error callback of a member's task (see `callbacks.step_chain_failed`): records an
    attempt its task ended outside of (a hard time limit, the process lost, the task's own
    error), or sends the member again when the broker refused its retry. A member's final
    failure sends the compensations itself: nothing to do for it here. Idempotent: the
    member's row names the epoch of its last send, and a callback of another does nothing."""
    with transaction.atomic():
        row = lock_member(saga_id, index, position)
        if row is None or row.status not in IN_PROGRESS or row.epoch != epoch:
            # Before the saga's lock: whoever holds it may be settling this row.
            logger.info("saga %s: error callback with nothing to do, ignored", saga_id)
            return
        unit = lock(saga_id)
        member = unit.member(index, position)
        stage = unit.steps[index]
        if member is None:
            return
        if not groups.going(unit, stage):
            # Its saga paused or turned back meanwhile: the attempt that ended outside its
            # transaction (a hard time limit, its process lost) still ran, and is counted.
            if not broker_failed(cause):
                error = outside_attempt_error(cause, task_id, int(member.definition["time_limit"]))
                groups.record_member_failure(unit, member, error, transient=True)
                unit.save()
            return
        if broker_failed(cause):
            groups.resend(unit, stage, member)
        else:
            error = outside_attempt_error(cause, task_id, int(member.definition["time_limit"]))
            if error.code == "task_failed":
                policy = unexpected_error_policy(member)
                outcome = groups.record_member_failure(
                    unit,
                    member,
                    error,
                    transient=policy == "retry",
                    pause="task failed" if policy == "pause" else "",
                    detail={"exception": cause or "", "reference": task_id},
                )
            else:
                outcome = groups.record_member_failure(unit, member, error, transient=True)
            if outcome.kind == "retry":
                groups.resend(unit, stage, member, countdown=outcome.countdown)
        unit.save()
