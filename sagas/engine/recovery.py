"""What the sweeper does to one saga: re-send a stalled one, or compensate a late one.

The sweeper (`sagas.engine.sweeper`) claims the sagas; these functions run in its transaction.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from ..definitions import is_child, is_group
from ..models import FINAL_STATUSES, IN_FLIGHT, Direction, EventKind, Saga, SagaEvent, SagaMember
from . import rows, waits
from .compensation import begin_compensation, finish_if_done
from .unit import SagaStatus, StepStatus, Unit, free_members, lock

# What `recover` did: re-sent the saga, gave up on it (too many stalls in a row), or passed
# over it (it ended, or it is not stalled: what comes next waits for something that runs).
RECOVERED, GAVE_UP, NOT_STALLED = "recovered", "gave_up", "not_stalled"


def recover(saga_id: UUID | str, *, max_recoveries: int) -> str:
    """Re-send a stalled saga from its rows; after too many stalls in a row, fail it.

    A stall is counted each time; any progress (a step or a compensation done) starts the
    count again. Returns what it did (`RECOVERED`, `GAVE_UP` or `NOT_STALLED`).
    """
    unit = lock(saga_id)
    saga = unit.saga
    if saga.status not in IN_FLIGHT:
        return NOT_STALLED
    fenced = [s.fenced_until for s in unit.to_compensate()[:1] if s.fenced_until is not None]
    if fenced and fenced[0] > rows.database_now():
        return NOT_STALLED  # its next compensation waits for an attempt that may run
    if _child_compensating(unit):
        return NOT_STALLED  # its next compensation waits for its child's
    if _member_at_work(unit):
        return NOT_STALLED  # a member's attempt (or its compensation) runs now
    if _children_at_work(unit):
        return NOT_STALLED  # its group waits for its child members' children
    stalls = saga.recovery_attempts + 1
    unit.set_saga(recovery_attempts=stalls)
    if stalls > max_recoveries:
        message = f"No progress after {max_recoveries} recoveries in a row; needs an operator."
        detail = unit.remember_cause({"reason": "recovery_exhausted", "direction": saga.direction})
        unit.halt_compensation()
        unit.set_saga(error_code="recovery_exhausted", error_message=message)
        unit.move_saga(SagaStatus.FAILED, EventKind.SAGA_FAILED, detail)
        unit.save()
        return GAVE_UP
    if saga.status == SagaStatus.COMPENSATING:
        # Also where a failed step's error callback was lost: its attempt began this.
        remaining = unit.to_compensate()
        unit.event(EventKind.RECOVERED, None, {"attempt": stalls, "compensations": len(remaining)})
        if remaining:
            unit.send_compensations()
        else:
            finish_if_done(unit)
    else:
        step = unit.in_progress()
        assert step is not None, "a saga going forward has a step to run"
        unit.event(EventKind.RECOVERED, None, {"attempt": stalls, "from_step": step.index})
        waits.go_on(unit, step.index)
    unit.save()
    return RECOVERED


def deadline_passed(saga_id: UUID | str) -> bool:
    """A saga going forward is past its deadline: compensate it, unless it passed its pivot.

    Returns whether compensation began.
    """
    unit = lock(saga_id)
    saga = unit.saga
    if saga.status not in (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.WAITING):
        return False
    if saga.is_backward:
        return False
    if unit.passed_pivot():
        if not SagaEvent.objects.filter(saga_id=saga.id, kind=EventKind.DEADLINE_PASSED).exists():
            unit.event(EventKind.DEADLINE_PASSED, None, {"action": "continue past the pivot"})
            unit.save_events()
        return False
    unit.set_saga(error_code="deadline_passed", error_message="The saga ran past its deadline.")
    begin_compensation(unit, EventKind.DEADLINE_PASSED, {"action": "compensate"})
    unit.save()
    return True


def _member_at_work(unit: Unit) -> bool:
    """Whether an attempt of a group member's action or compensation runs now: it holds its
    member's row, as a step's attempt holds the saga's (which the sweeper passes over), while
    the saga's row shows no progress. Asked with SKIP LOCKED: never waiting for one."""
    busy = [
        member
        for stage in unit.steps
        if is_group(stage.definition)
        and stage.status in (StepStatus.RUNNING, StepStatus.COMPENSATING)
        for member in unit.members(stage.index)
        if member.status in (StepStatus.RUNNING, StepStatus.COMPENSATING)
    ]
    return len(free_members(busy)) < len(busy)


def _child_compensating(unit: Unit) -> bool:
    """Whether the saga's next compensation is a child stage's (or a group's child members')
    whose child compensates, or whose child a step of it holds (the compensation turns it back
    once that step ends): it waits for the child, and is not stalled."""
    if unit.saga.status != SagaStatus.COMPENSATING:
        return False
    owed = unit.to_compensate()
    following = unit.compensating_together(owed) or owed[:1]
    children = _children_where(unit, following)
    if children.filter(status=SagaStatus.COMPENSATING).exists():
        return True
    in_flight = set(
        children.exclude(status__in=FINAL_STATUSES)
        .exclude(direction=Direction.BACKWARD)
        .values_list("pk", flat=True)
    )
    free = Saga.objects.select_for_update(no_key=True, skip_locked=True).filter(pk__in=in_flight)
    return bool(in_flight - set(free.values_list("pk", flat=True)))


def _children_at_work(unit: Unit) -> bool:
    """Whether the saga goes forward in a group whose running members are child members, one
    of whose children is in flight: it waits for them, as a wait does (a step member running
    without its row held is stalled: it is sent again)."""
    stage = unit.in_progress() if unit.saga.status == SagaStatus.RUNNING else None
    if stage is None or not is_group(stage.definition):
        return False
    running = [m for m in unit.members(stage.index) if m.status == StepStatus.RUNNING]
    if not running or not all(is_child(m.definition) for m in running):
        return False
    return _children_where(unit, running).exclude(status__in=FINAL_STATUSES).exists()


def _children_where(unit: Unit, stages: list[Any], status: str | None = None) -> Any:
    """The children of `stages` (child stages, or a group's child members) that have
    `status`; none for stages that start no child."""
    found = Saga.objects.none()
    for stage in (s for s in stages if is_child(s.definition)):
        position = stage.position if isinstance(stage, SagaMember) else None
        found |= Saga.objects.filter(
            parent_id=unit.saga.pk, parent_stage=stage.index, parent_member=position
        )
    return found.filter(status=status) if status else found
