"""Child sagas: a stage that starts another saga and waits for it, holding no worker.

The transaction that reaches a child stage starts the child (its rows, linked to the parent
and the stage) and the parent waits (`enter_child`). The child's end (completed, compensated,
or stopped for an operator) sends `sagas.child_ended` after its commit; the parent, under its
own lock, then goes on with the child's outputs, or fails the stage with the child's error
(`child_ended`). If that message is lost, the sweeper finds the waiting parent of a finished
child and does the same (`finished_children`).

A group's member may be a child too (`sagas.definitions.Group`): it runs no task; its child
is started when the group sends it (`start_child`), and the child's end completes or fails
the member (`member_child_ended`) as an attempt of a step member would.

When the parent compensates, its child stage is compensated by compensating the child
(`compensate_child`): a completed child turns backward (the only way a completed saga
changes), one in flight is aborted, and the parent's compensation waits, polling, until the
child is compensated. Locks are taken parent first, then child, never the other way: a
child's own transitions never lock its parent (they send a message instead).
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any
from uuid import UUID

from django.db import transaction
from django.db.models import F, OuterRef, Subquery
from django.utils import timezone

from ..definitions import MAX_CHILD_DEPTH, import_callable, is_child
from ..exceptions import DefinitionError, SagaBusy, SagaKeyError, SagaKeyInFlight
from ..models import FINAL_STATUSES, Direction, EventKind, Saga, SagaMember, SagaStatus, SagaStep
from . import dispatch
from .compensation import (
    begin_compensation,
    its_turn,
    record_compensated,
    record_compensation_failure,
)
from .forward import start
from .groups import after_member, going, record_member_failure
from .unit import (
    BEGIN_STAGE,
    COMPENSATE_MEMBER,
    COMPENSATE_STAGE,
    DONE,
    START_MEMBER,
    TURN_BACK_MEMBER,
    TURN_BACK_STAGE,
    Outcome,
    SafeError,
    StageNotBegun,
    StepStatus,
    Unit,
    compensates_concurrently,
    compensation_time_limit,
    lock,
    lock_member,
)

logger = logging.getLogger("sagas")

# Seconds a parent's compensation waits before it looks again at its child's (which also
# tells it when it ends: `child_ended`).
CHILD_POLL = 5.0
# Seconds a parent's compensation waits for its child's lock (a step of the child running).
CHILD_LOCK_WAIT = 2.0


def children_of(saga_id: Any, index: int, member: int | None = None) -> Any:
    """The children the stage `index` started (those its group's `member` started)."""
    return Saga.objects.filter(parent_id=saga_id, parent_stage=index, parent_member=member)


def child_of(saga_id: Any, index: int, member: int | None = None) -> Saga | None:
    """The stage's child (its group's `member`'s): the last one it started (a retry of the
    stage starts another)."""
    return children_of(saga_id, index, member).order_by("-created_at").first()


def _depth(saga_id: Any) -> int:
    """How many ancestors the saga has."""
    depth, parent = 0, Saga.objects.filter(pk=saga_id).values_list("parent_id", flat=True).first()
    while parent is not None and depth <= MAX_CHILD_DEPTH:
        depth += 1
        parent = Saga.objects.filter(pk=parent).values_list("parent_id", flat=True).first()
    return depth


# -- forward -------------------------------------------------------------------------------------


def start_child(unit: Unit, step: Any) -> Saga:
    """Start the child of a child stage, or of a group's child member (`step`: its row), in
    this transaction; raises `StageNotBegun` with the error when it cannot begin."""
    definition = step.definition
    saga = unit.saga
    member = step.position if isinstance(step, SagaMember) else None
    try:
        if saga.parent_id is not None and _depth(saga.pk) >= MAX_CHILD_DEPTH:
            raise StageNotBegun("child_too_deep", f"Children nest at most {MAX_CHILD_DEPTH} deep.")
        path = definition.get("input")
        child_input = import_callable(path)(unit.context(step)) if path else saga.input
        if not isinstance(child_input, dict):
            raise StageNotBegun("child_input_invalid", "A child's input must be a dict.")
        number = children_of(saga.pk, step.index, member).count() + 1
        at = str(step.index) if member is None else f"{step.index}.{member}"
        child, _ = start(
            definition["saga"],
            child_input,
            idempotency_key=f"{saga.pk}:{at}:{number}",
            created_by_id=saga.created_by_id,
            parent=(saga.pk, step.index),
            parent_member=member,
        )
    except StageNotBegun:
        raise
    except (DefinitionError, SagaKeyError, SagaKeyInFlight) as exc:
        code = "child_in_flight" if isinstance(exc, SagaKeyInFlight) else "child_not_begun"
        raise StageNotBegun(code, str(exc)[:500]) from None
    except Exception as exc:  # the project's `input`: a bug of its own
        logger.warning(
            "The child %s of saga %s could not begin: %s",
            getattr(step, "label", step.name),
            saga.pk,
            type(exc).__name__,
        )
        message = f"The child's input raised {type(exc).__name__}; fix it and retry."
        raise StageNotBegun("child_not_begun", message) from None
    return child


def enter_child(unit: Unit, stage: Any) -> None:
    """Start the stage's child, in this transaction, and wait for it."""
    unit.set_saga(current_step=stage.index)
    try:
        child = start_child(unit, stage)
    except StageNotBegun as exc:
        unit.stage_not_begun(stage, exc.error)
        return
    now = timezone.now()
    unit.move_step(
        stage,
        StepStatus.WAITING,
        EventKind.CHILD_STARTED,
        {"child": str(child.pk), "saga": child.name},
        started_at=stage.started_at or now,
        finished_at=None,
        error_code="",
        error_message="",
    )
    unit.move_saga(SagaStatus.WAITING, None)


def child_ended(parent_id: UUID | str, index: int) -> None:
    """The child of the parent's stage `index` ended (or stopped for an operator): the
    parent goes on with its outputs, or fails the stage with its error; a parent waiting for
    its child's compensation carries on with its own. Idempotent: the parent's rows say
    whether it still waits."""
    with transaction.atomic():
        unit = lock(parent_id)
        stage = unit.steps[index]
        if not is_child(stage.definition):
            return
        if unit.saga.status == SagaStatus.COMPENSATING:
            if stage.status == StepStatus.COMPENSATING and unit.to_compensate()[:1] == [stage]:
                unit.send_compensations()  # its compensation polls: no need to wait for it
                unit.save()
            return
        child = child_of(parent_id, index)
        if stage.status != StepStatus.WAITING or child is None:
            return
        if child.status == SagaStatus.COMPLETED:
            outputs = dict(SagaStep.objects.filter(saga=child).values_list("name", "output"))
            unit.move_step(
                stage,
                StepStatus.COMPLETED,
                EventKind.STEP_COMPLETED,
                {"child": str(child.pk)},
                output=outputs,
                attempts=stage.attempts + 1,
                finished_at=timezone.now(),
            )
            unit.progressed()
            unit.move_saga(SagaStatus.RUNNING, None)
            unit.go_on(index + 1)
        elif child.status == SagaStatus.COMPENSATED:
            error = SafeError(
                child.error_code or "child_compensated",
                child.error_message or f"The child saga {child.name} was compensated.",
            )
            unit.move_step(
                stage,
                StepStatus.FAILED,
                EventKind.STEP_FAILED,
                {**error.as_dict(), "child": str(child.pk)},
                attempts=stage.attempts + 1,
                finished_at=timezone.now(),
                error_code=error.code,
                error_message=error.message,
            )
            unit.set_saga(error_code=error.code, error_message=error.message)
            if unit.passed_pivot():
                detail = {"step": stage.name, "reason": "failed after the pivot"}
                unit.move_saga(SagaStatus.FAILED, EventKind.SAGA_PAUSED, detail)
            else:
                begin_compensation(unit, EventKind.COMPENSATION_STARTED, {"step": stage.name})
        else:
            return  # stopped for an operator, or still in flight: the parent waits
        unit.save()


def finished_children(batch_size: int = 200) -> int:
    """The sweeper's safety net: parents that wait for a child that has ended (its message
    lost) are told. Returns how many."""
    found = list(
        Saga.objects.filter(parent__status=SagaStatus.WAITING, status__in=FINAL_STATUSES)
        .filter(parent_stage=F("parent__current_step"))
        .values_list("parent_id", "parent_stage")
        .distinct()[:batch_size]
    )
    for parent_id, index in found:
        child_ended(parent_id, int(index or 0))
    return len(found)


# -- backward ------------------------------------------------------------------------------------


def compensate_child(unit: Unit, step: Any) -> Outcome:
    """The parent compensates its child stage (or a group's child member, `step`): once the
    child is compensated, the stage is; until then, the child is turned backward (a completed
    one too, or one in flight) and this looks again later. Runs under the parent's lock, as the
    stage's compensation."""
    child = child_of(unit.saga.pk, step.index, _position(step))
    if child is None or child.status == SagaStatus.COMPENSATED:
        detail = {"child": str(child.pk)} if child else {}
        record_compensated(unit, step, step.compensation_attempts + 1, detail=detail)
        unit.save(commit=True)
        return DONE
    if child.status == SagaStatus.FAILED and child.direction == Direction.BACKWARD:
        error = SafeError(
            "child_compensation_failed",
            f"The compensation of the child saga {child.name} stopped: {child.error_message}"[:500],
        )
        outcome = record_compensation_failure(
            unit, step, error, give_up=True, detail={"child": str(child.pk)}
        )
        unit.save()
        return outcome
    if child.status != SagaStatus.COMPENSATING:
        with suppress(SagaBusy):  # a step of the child is running: next time
            _turn_back(child.pk, unit.saga.pk)
    return Outcome("retry", countdown=CHILD_POLL)


def abort_child(unit: Unit, step: Any) -> None:
    """The parent turns back while its child (a stage's, or a group's child member's, `step`)
    is in flight: the child is aborted at once (its compensation begins), unless a step of it
    holds it (then the stage's compensation does it, in its turn). Never waits for the child's
    lock (SKIP LOCKED): a group's settling may abort many children, under the parent's lock."""
    child = child_of(unit.saga.pk, step.index, _position(step))
    if child is None or child.status in FINAL_STATUSES:
        return
    free = Saga.objects.select_for_update(no_key=True, skip_locked=True).filter(pk=child.pk)
    if list(free.values_list("pk", flat=True)):  # locked by this transaction: taken at once
        _turn_back(child.pk, unit.saga.pk)


def _position(step: Any) -> int | None:
    """A group member's position; None for a stage."""
    return step.position if isinstance(step, SagaMember) else None


def _turn_back(child_id: Any, parent_id: Any) -> None:
    """Begin the child's compensation, as its parent compensates (parent's lock held). In a
    savepoint of its own: `SagaBusy` (a step of the child holds it) leaves the parent's
    transaction as it was."""
    with transaction.atomic():
        _turn_back_now(child_id, parent_id)


def _turn_back_now(child_id: Any, parent_id: Any) -> None:
    child = lock(child_id, wait=CHILD_LOCK_WAIT)
    saga = child.saga
    if saga.status in (SagaStatus.COMPENSATING, SagaStatus.COMPENSATED) or (
        saga.status == SagaStatus.FAILED and saga.is_backward
    ):
        return
    if saga.status != SagaStatus.COMPLETED:
        # In flight or paused going forward: aborted, as an operator's abort would.
        child.set_saga(
            error_code="parent_compensating",
            error_message="Its parent saga is compensating.",
            recovery_attempts=0,
        )
    child.set_saga(finished_at=None)
    begin_compensation(child, EventKind.COMPENSATION_STARTED, {"parent": str(parent_id)})
    child.save()


# -- a child member ----------------------------------------------------------------------------


def member_child_ended(parent_id: UUID | str, index: int, position: int) -> None:
    """The child of the group's member at `position` ended (or stopped for an operator): the
    member completes with the child's outputs, or fails for good with its error (and its group
    with it, beyond a map's tolerance); a parent waiting for the child's compensation carries
    on with its own. Idempotent: the rows say whether the member still waits for it."""
    with transaction.atomic():
        if lock_member(parent_id, index, position) is None:
            return  # before the saga's lock, as for any change of a member's row
        unit = lock(parent_id)
        member = unit.member(index, position)
        if member is None or not is_child(member.definition):
            return
        stage = unit.steps[index]
        if unit.saga.status == SagaStatus.COMPENSATING:
            if member.status == StepStatus.COMPENSATING and its_turn(unit, member):
                resend_compensation(unit, member)  # its compensation polls: no need to wait
                unit.save()
            return
        child = child_of(parent_id, index, position)
        if member.status != StepStatus.RUNNING or child is None:
            return
        if child.status == SagaStatus.COMPLETED:
            outputs = dict(SagaStep.objects.filter(saga=child).values_list("name", "output"))
            started = member.started_at or timezone.now()
            unit.attempt_completed(member, member.attempts + 1, outputs, started)
            if going(unit, stage):
                after_member(unit, stage)
        elif child.status == SagaStatus.COMPENSATED:
            error = SafeError(
                child.error_code or "child_compensated",
                child.error_message or f"The child saga {child.name} was compensated.",
            )
            record_member_failure(unit, member, error, detail={"child": str(child.pk)})
        else:
            return  # stopped for an operator: the member waits
        unit.save()


def finished_member_children(batch_size: int = 200) -> int:
    """The sweeper's safety net for child members: a running member whose child has ended
    (its message lost) is told. Returns how many."""
    latest = Saga.objects.filter(
        parent_id=OuterRef("saga_id"),
        parent_stage=OuterRef("stage"),
        parent_member=OuterRef("position"),
    ).order_by("-created_at")
    found = list(
        SagaMember.objects.filter(saga__status=SagaStatus.RUNNING, status=StepStatus.RUNNING)
        .annotate(child_status=Subquery(latest.values("status")[:1]))
        .filter(child_status__in=FINAL_STATUSES)
        .order_by()
        .values_list("saga_id", "stage", "position")[:batch_size]
    )
    for saga_id, index, position in found:
        member_child_ended(saga_id, index, position)
    return len(found)


def resend_compensation(unit: Unit, member: SagaMember) -> None:
    """Send a member's compensation again now (its child was compensated: no need to wait for
    its poll): with its group's other members if they compensate one at a time (a chain), on
    its own if they compensate concurrently."""
    if not compensates_concurrently(unit.steps[member.index]):
        unit.send_compensations()
        return
    saga_id, epoch = str(unit.saga.pk), unit._next_epoch()
    entry: list[dispatch.Entry] = [(member.index, compensation_time_limit(member), member.position)]
    unit.after_commit.append(lambda: dispatch.send_member_compensations(saga_id, epoch, entry, 0.0))


BEGIN_STAGE["child"] = enter_child
COMPENSATE_STAGE["child"] = compensate_child
TURN_BACK_STAGE["child"] = abort_child
START_MEMBER["child"] = start_child
COMPENSATE_MEMBER["child"] = compensate_child
TURN_BACK_MEMBER["child"] = abort_child
