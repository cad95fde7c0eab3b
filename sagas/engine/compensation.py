"""Going backward: begin a compensation, run one step's compensation, record a failed one.

When a saga begins compensating, every step whose compensation is owed moves to
`compensating` in the same transaction, and the saga's direction becomes backward for good:
the rows, not the messages, say what is left to undo.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from .. import conf
from ..definitions import is_group
from ..exceptions import CodeMissing
from ..models import EventKind, SagaMember
from . import rows
from .rows import StepRow
from .unit import (
    COMPENSATE_MEMBER,
    COMPENSATE_STAGE,
    DONE,
    DUPLICATE,
    IN_PROGRESS,
    STOP,
    TURN_BACK_MEMBER,
    TURN_BACK_STAGE,
    Outcome,
    SafeError,
    SagaStatus,
    StepStatus,
    Unit,
    claim_members,
    compensates_concurrently,
    compensation_time_limit,
    free_members,
    lock,
    lock_member,
    log_failure,
    peek,
    policy_of,
    resolve,
    safe_error,
    staff_detail,
)


def begin_compensation(
    unit: Unit, kind: str, detail: dict[str, Any] | None = None, *, send: bool = True
) -> None:
    """Turn the saga backward and mark what it owes; send the compensations unless `send` is
    false (a failing step's attempt leaves that to the chain's error callback)."""
    owed = unit.owed_on_compensation()
    current = unit.in_progress()
    if current is not None and current.status == StepStatus.WAITING and current not in owed:
        # A wait ends, never completed: nothing to undo, no attempt to fence.
        unit.move_step(current, StepStatus.PENDING, None, due_at=None)
    if current is not None and current.status == StepStatus.RUNNING and current not in owed:
        # Between two attempts, not owed a compensation: it will not run again.
        unit.move_step(current, StepStatus.FAILED, None, finished_at=timezone.now())
    detail = {**(detail or {}), "steps": [s.name for s in owed]}
    for step in owed:
        if step is current and step.status in IN_PROGRESS and not is_group(step.definition):
            # Turned back from outside an attempt of the step (an operator, a deadline), while
            # an attempt of it may still run: its session may have ended (a restart, a
            # failover), releasing the lock, while its worker went on. The compensation waits
            # until that attempt cannot be running any more.
            until = fence_of(step)
            unit.move_step(step, StepStatus.COMPENSATING, None, fenced_until=until)
            detail["waits_for"] = {"step": step.name, "until": until.isoformat()}
        elif step.status != StepStatus.COMPENSATING:
            unit.move_step(step, StepStatus.COMPENSATING, None)
    unit.move_saga(SagaStatus.COMPENSATING, kind, detail)
    turn_back = TURN_BACK_STAGE.get(str(current.definition.get("kind", ""))) if current else None
    if turn_back is not None:
        turn_back(unit, current)  # a child in flight is aborted now, not when its turn comes
    if not owed:
        unit.move_saga(SagaStatus.COMPENSATED, EventKind.SAGA_COMPENSATED)
        return
    unit.set_saga(current_step=owed[0].index)
    if send:
        unit.send_compensations()


# Seconds a group's settling waits before it looks again for a member's attempt still running.
SETTLE_POLL = 1.0
# What a fence adds to an attempt's time limit and the hard kill's grace: the time the
# worker's main process takes to notice the limit and kill the attempt's process.
FENCE_MARGIN = 5


def fence_of(step: StepRow) -> datetime:
    """Until when an attempt of the step that began before now may still run: its time
    limit, then the hard kill (`SAGAS_HARD_TIME_LIMIT_GRACE`) and a margin, on the database's
    clock. It relies on the hard kill, which Celery's prefork pool does (not its threads or
    gevent pools, which cannot kill an attempt)."""
    limit = int(step.definition["time_limit"]) + conf.hard_time_limit_grace() + FENCE_MARGIN
    return rows.database_now() + timedelta(seconds=limit)


def compensation_attempt(
    saga_id: str,
    index: int,
    *,
    epoch: int,
    fault: Any = None,
    bound: float | None = None,
    member: int | None = None,
) -> Outcome:
    """Run one step's (or a group's `member`'s) compensation and record it in the same
    transaction. A group's own compensation settles its members first (`groups.settle`)."""
    if member is not None:
        return member_compensation_attempt(
            saga_id, index, member, epoch=epoch, fault=fault, bound=bound
        )
    with transaction.atomic():
        unit = lock(saga_id, bound=bound)
        step: Any = unit.steps[index]
        if step.status != StepStatus.COMPENSATED and its_turn(unit, step):
            if is_group(step.definition):
                return settle(unit, step)
            undo_stage = COMPENSATE_STAGE.get(str(step.definition.get("kind", "")))
            if undo_stage is not None:
                return undo_stage(unit, step)
        not_now = _not_due(unit, step, epoch)
        if not_now is not None:
            return not_now
        attempt = _undo(unit, step, fault)
        record_compensated(unit, step, attempt)
        unit.save(commit=True)
    return DONE


def member_compensation_attempt(
    saga_id: str,
    index: int,
    position: int,
    *,
    epoch: int,
    fault: Any = None,
    bound: float | None = None,
) -> Outcome:
    """Run one attempt of a member's compensation holding its row's lock (as an attempt of its
    action does), and record it under the saga's: the members of a group that compensates
    concurrently undo at the same time."""
    with transaction.atomic():
        if lock_member(saga_id, index, position, bound=bound) is None:
            return STOP
        seen = peek(saga_id)  # as it is: the saga's lock is taken to record the outcome only
        member: Any = seen.member(index, position)  # read after its row's lock: as it is
        if member is None:
            return STOP
        not_now = _not_due(seen, member, epoch)
        if not_now is not None:
            return not_now
        undo_member = COMPENSATE_MEMBER.get(str(member.definition.get("kind", "")))
        if undo_member is not None:  # a child member: its child is compensated
            unit = lock(saga_id)
            recorded = unit.member(index, position)
            if recorded is None or not its_turn(unit, recorded):
                return STOP
            return undo_member(unit, recorded)
        attempt = _undo(seen, member, fault)
        unit = lock(saga_id)
        recorded = unit.member(index, position)
        assert recorded is not None and recorded.status == StepStatus.COMPENSATING, "locked"
        record_compensated(unit, recorded, attempt)
        unit.save(commit=True)
    return DONE


def _not_due(unit: Unit, step: Any, epoch: int) -> Outcome | None:
    """Why a compensation's message does nothing now (None: it runs): it ran before (a
    duplicate delivery, on the timeline), it is not its turn, or it waits for its fence (an
    attempt of its action may still run; nothing counted)."""
    if step.status == StepStatus.COMPENSATED:
        if not unit.is_current(epoch):
            return STOP  # a newer chain carries the saga on from here
        unit.event(EventKind.DUPLICATE_IGNORED, step, {"of": "compensation"})
        unit.save_events()
        return DUPLICATE
    if not its_turn(unit, step):
        return STOP
    if step.fenced_until is not None:
        wait = (step.fenced_until - rows.database_now()).total_seconds()
        if wait > 0:
            return Outcome("retry", countdown=wait)
    return None


def _undo(unit: Unit, step: Any, fault: Any) -> int:
    """Run the step's (or member's) compensation, if it has one: the attempt's number."""
    undo = resolve(step.compensation) if step.compensation else None
    ctx = unit.context(step, compensation=True)
    with unit.attempt(step, compensation=True):
        if fault is not None:
            fault.before_compensation()
        if undo is not None:
            undo(ctx)
    return ctx.attempt


def record_compensated(
    unit: Unit, step: Any, attempt: int, *, detail: dict[str, Any] | None = None
) -> None:
    """Record a compensation that ran (a step's, or a member's), and what comes next."""
    unit.move_step(
        step,
        StepStatus.COMPENSATED,
        EventKind.STEP_COMPENSATED,
        {"attempt": attempt, **(detail or {})},
        compensated_at=timezone.now(),
        compensation_attempts=attempt,
    )
    if isinstance(step, SagaMember):
        member_compensated(unit, step)
    unit.progressed()
    if unit.saga.status == SagaStatus.COMPENSATING:
        finish_if_done(unit)
        _after_members_together(unit, step)


def its_turn(unit: Unit, step: StepRow | SagaMember) -> bool:
    """The saga is compensating, this step is owed, and no later step still waits (reverse
    order: a message that arrives early stops, and the later step's chain brings it again).
    A member of a group that compensates concurrently: any of its group's owed members, once
    nothing after the group is owed."""
    if unit.saga.status != SagaStatus.COMPENSATING or step.status != StepStatus.COMPENSATING:
        return False
    owed = unit.to_compensate()
    return owed[0] is step or step in unit.compensating_together(owed)


def _after_members_together(unit: Unit, step: Any) -> None:
    """After a member of a group that compensates concurrently ended its compensation (or
    gave up on it, carrying on): the last of them sends the rest, as a new chain. A chain's
    compensation needs none of this: its chain goes on."""
    if not isinstance(step, SagaMember) or not compensates_concurrently(unit.steps[step.index]):
        return
    owed = (StepStatus.COMPENSATING,)
    if any(m.status in owed for m in unit.members(step.index)):
        return  # another member's compensation still runs (or is due)
    if unit.saga.status == SagaStatus.COMPENSATING:
        unit.send_compensations()


def finish_if_done(unit: Unit) -> None:
    """After a compensation: the next one is due, or the saga is compensated, or failed."""
    remaining = unit.to_compensate()
    if remaining:
        unit.set_saga(current_step=remaining[0].index)
        return
    failed: list[Any] = [s for s in unit.steps if s.status == StepStatus.COMPENSATION_FAILED]
    failed += [
        m
        for s in unit.steps
        if is_group(s.definition)
        for m in unit.members(s.index)
        if m.status == StepStatus.COMPENSATION_FAILED
    ]
    if failed:
        _fail_saga(unit, failed[0])
    else:
        unit.move_saga(SagaStatus.COMPENSATED, EventKind.SAGA_COMPENSATED)


def _fail_saga(unit: Unit, step: StepRow) -> None:
    detail = unit.remember_cause({"step": getattr(step, "label", step.name)})
    unit.halt_compensation()
    name = getattr(step, "label", step.name)
    unit.set_saga(
        current_step=step.index,
        error_code="compensation_failed",
        error_message=f"The compensation of step {name} failed.",
    )
    unit.move_saga(SagaStatus.FAILED, EventKind.SAGA_FAILED, detail)


def compensation_attempt_failed(
    saga_id: str, index: int, exc: BaseException, *, epoch: int, member: int | None = None
) -> Outcome:
    """Record a failed compensation attempt: retry while the policy allows, else fail it."""
    with transaction.atomic():
        if member is not None:
            lock_member(saga_id, index, member)  # before the saga's: see `lock_member`
        unit = lock(saga_id)
        step: Any = unit.steps[index] if member is None else unit.member(index, member)
        if step is None or not its_turn(unit, step):
            return STOP
        if "kind" in step.definition:
            # A group's settling or a child's compensation failed (a lock wait, its time
            # limit): nothing of its own to count; it is tried again.
            return Outcome("retry", countdown=SETTLE_POLL)
        error = safe_error(exc, time_limit=compensation_time_limit(step))
        attempt = step.compensation_attempts + 1
        reference = log_failure(unit, step, attempt, exc, compensation=True)
        outcome = record_compensation_failure(
            unit,
            step,
            error,
            give_up=isinstance(exc, CodeMissing),
            detail=staff_detail(exc, reference),
        )
        unit.save()
    return outcome


def record_compensation_failure(
    unit: Unit,
    step: StepRow,
    error: SafeError,
    *,
    give_up: bool = False,
    detail: dict[str, Any] | None = None,
) -> Outcome:
    """Count a failed compensation attempt from the rows; retry it, or give up on it.

    Compensations retry any error, but for code that a deploy removed (`give_up`: retrying
    cannot bring it back). One that exhausts its policy is `compensation_failed`: the saga
    stops there for an operator or, with `continue_compensation_on_failure`, the chain goes
    on to the earlier steps ("done") and the saga ends failed after them.
    """
    # A child stage has no compensation of its own, nor a policy: it only ever gives up.
    policy = policy_of(step, "compensation_retry") if not give_up else None
    attempt = step.compensation_attempts + 1
    values = {
        "compensation_attempts": attempt,
        "error_code": error.code,
        "error_message": error.message,
    }
    extra = detail or {}
    if policy is not None and attempt < policy.max_attempts:
        countdown = policy.countdown(attempt)
        retrying = {**error.as_dict(), "attempt": attempt, "retry_in_s": round(countdown, 3)}
        unit.move_step(
            step,
            StepStatus.COMPENSATING,
            EventKind.COMPENSATION_RETRYING,
            {**retrying, **extra},
            **values,
        )
        return Outcome("retry", countdown=countdown, error=error)
    unit.move_step(
        step,
        StepStatus.COMPENSATION_FAILED,
        EventKind.COMPENSATION_FAILED,
        {**error.as_dict(), "attempt": attempt, **extra},
        **values,
    )
    if unit.to_compensate() and unit.saga.options.get("continue_compensation_on_failure"):
        unit.set_saga(current_step=unit.to_compensate()[0].index)
        _after_members_together(unit, step)
        return DONE
    _fail_saga(unit, step)
    return Outcome("fail", error=error)


# -- a group's members ----------------------------------------------------------------------


def settle(unit: Unit, stage: Any) -> Outcome:
    """Begin the compensation of a group: once no member's attempt runs (their rows are
    locked while they do), mark what is owed (the members that completed; those that may have
    started where their definition says `compensate_failed_step`), and send the compensations
    from the rows. Runs as the group's first compensation, under the saga's lock.

    It takes every member row it changes with SKIP LOCKED first: whoever holds one (an
    attempt, or a late delivery that locks its member before the saga) is let finish, and
    this looks again a moment later: it never waits for a member that waits for the saga."""
    members = unit.members(stage.index)
    moving = [m for m in members if m.status in (*IN_PROGRESS, StepStatus.COMPLETED)]
    moving += [
        m
        for m in members
        if m.status == StepStatus.FAILED and m.definition.get("compensate_failed_step")
    ]
    if len(free_members(moving)) < len(moving):
        return Outcome("retry", countdown=SETTLE_POLL)  # a member's row is held: later
    owed = []
    for member in members:
        undo_failed = bool(member.definition.get("compensate_failed_step"))
        turn_back = TURN_BACK_MEMBER.get(str(member.definition.get("kind", "")))
        if member.status == StepStatus.COMPLETED:
            owed.append(member)
            unit.move_step(member, StepStatus.COMPENSATING, None)
        elif member.status == StepStatus.RUNNING and turn_back is not None:
            # A child member whose child is in flight: aborted now, compensated in its turn.
            owed.append(member)
            unit.move_step(member, StepStatus.COMPENSATING, None)
            turn_back(unit, member)
        elif member.status == StepStatus.RUNNING and undo_failed:
            # Sent: it may have begun an attempt whose session ended while its worker went
            # on; its compensation waits until that cannot run any more.
            owed.append(member)
            unit.move_step(
                member,
                StepStatus.COMPENSATING,
                None,
                fenced_until=fence_of(member),  # type: ignore[arg-type]
            )
        elif member.status == StepStatus.FAILED and undo_failed:
            owed.append(member)
            unit.move_step(member, StepStatus.COMPENSATING, None)
        elif member.status == StepStatus.RUNNING:
            if member.attempts > 0:
                unit.move_step(member, StepStatus.FAILED, None, finished_at=timezone.now())
            else:
                unit.move_step(member, StepStatus.PENDING, None)  # sent, never run
        # Pending: never sent, never run; nothing to undo.
    detail = {"members": [m.name for m in reversed(owed)]}
    if owed:
        unit.move_step(stage, StepStatus.COMPENSATING, None, compensation_attempts=1)
        unit.event(EventKind.COMPENSATION_STARTED, stage, detail)
    else:
        unit.move_step(
            stage,
            StepStatus.COMPENSATED,
            EventKind.STEP_COMPENSATED,
            detail,
            compensation_attempts=1,
            compensated_at=timezone.now(),
        )
    unit.progressed()
    finish_if_done(unit)
    if unit.saga.status == SagaStatus.COMPENSATING:
        unit.send_compensations()  # a new chain, from the rows as settled
    unit.save()
    return STOP


def member_compensated(unit: Unit, member: SagaMember) -> None:
    """After a member's compensation: its group is compensated once none of its members is
    owed any more."""
    stage = unit.steps[member.index]
    owed = (StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED)
    if not any(m.status in owed for m in unit.members(stage.index)):
        unit.move_step(stage, StepStatus.COMPENSATED, None, compensated_at=timezone.now())


def resume_members(unit: Unit) -> None:
    """An operator resumes a halted compensation: a member whose compensation failed gets a
    new budget, as a step's does."""
    for stage in unit.steps:
        if is_group(stage.definition) and stage.status == StepStatus.COMPENSATING:
            failed = [
                m for m in unit.members(stage.index) if m.status == StepStatus.COMPENSATION_FAILED
            ]
            claim_members(failed)
            for member in failed:
                unit.move_step(member, StepStatus.COMPENSATING, None, compensation_attempts=0)
