"""Child sagas: a stage that starts another saga and waits for it, holding no worker.

The transaction that reaches a child stage starts the child (its rows, linked to the parent
and the stage) and the parent waits (`enter_child`). The child's end (completed, compensated,
or stopped for an operator) sends `sagas.child_ended` after its commit; the parent, under its
own lock, then goes on with the child's outputs, or fails the stage with the child's error
(`child_ended`). If that message is lost, the sweeper finds the waiting parent of a finished
child and does the same (`finished_children`).

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
from django.db.models import F
from django.utils import timezone

from ..definitions import MAX_CHILD_DEPTH, import_callable, is_child
from ..exceptions import DefinitionError, SagaBusy, SagaKeyError, SagaKeyInFlight
from ..models import FINAL_STATUSES, Direction, EventKind, Saga, SagaStatus, SagaStep
from .compensation import begin_compensation, finish_if_done, record_compensation_failure
from .forward import start
from .unit import (
    BEGIN_STAGE,
    COMPENSATE_STAGE,
    DONE,
    TURN_BACK_STAGE,
    Outcome,
    SafeError,
    StageNotBegun,
    StepStatus,
    Unit,
    lock,
)

logger = logging.getLogger("sagas")

# Seconds a parent's compensation waits before it looks again at its child's (which also
# tells it when it ends: `child_ended`).
CHILD_POLL = 5.0
# Seconds a parent's compensation waits for its child's lock (a step of the child running).
CHILD_LOCK_WAIT = 2.0


def children_of(saga_id: Any, index: int) -> Any:
    return Saga.objects.filter(parent_id=saga_id, parent_stage=index)


def child_of(saga_id: Any, index: int) -> Saga | None:
    """The stage's child: the last one it started (a retry of the stage starts another)."""
    return children_of(saga_id, index).order_by("-created_at").first()


def _depth(saga_id: Any) -> int:
    """How many ancestors the saga has."""
    depth, parent = 0, Saga.objects.filter(pk=saga_id).values_list("parent_id", flat=True).first()
    while parent is not None and depth <= MAX_CHILD_DEPTH:
        depth += 1
        parent = Saga.objects.filter(pk=parent).values_list("parent_id", flat=True).first()
    return depth


# -- forward -------------------------------------------------------------------------------------


def enter_child(unit: Unit, stage: Any) -> None:
    """Start the stage's child, in this transaction, and wait for it."""
    definition = stage.definition
    saga = unit.saga
    unit.set_saga(current_step=stage.index)
    try:
        if saga.parent_id is not None and _depth(saga.pk) >= MAX_CHILD_DEPTH:
            raise StageNotBegun("child_too_deep", f"Children nest at most {MAX_CHILD_DEPTH} deep.")
        path = definition.get("input")
        child_input = import_callable(path)(unit.context(stage)) if path else saga.input
        if not isinstance(child_input, dict):
            raise StageNotBegun("child_input_invalid", "A child's input must be a dict.")
        number = children_of(saga.pk, stage.index).count() + 1
        child, _ = start(
            definition["saga"],
            child_input,
            idempotency_key=f"{saga.pk}:{stage.index}:{number}",
            created_by_id=saga.created_by_id,
            parent=(saga.pk, stage.index),
        )
    except StageNotBegun as exc:
        unit.stage_not_begun(stage, exc.error)
        return
    except (DefinitionError, SagaKeyError, SagaKeyInFlight) as exc:
        code = "child_in_flight" if isinstance(exc, SagaKeyInFlight) else "child_not_begun"
        unit.stage_not_begun(stage, SafeError(code, str(exc)[:500]))
        return
    except Exception as exc:  # the project's `input`: a bug of its own
        logger.warning(
            "The child %s of saga %s could not begin: %s", stage.name, saga.pk, type(exc).__name__
        )
        message = f"The child's input raised {type(exc).__name__}; fix it and retry."
        unit.stage_not_begun(stage, SafeError("child_not_begun", message))
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


def compensate_child(unit: Unit, stage: Any) -> Outcome:
    """The parent compensates its child stage: once the child is compensated, the stage is;
    until then, the child is turned backward (a completed one too, or one in flight) and this
    looks again later. Runs under the parent's lock, as the stage's compensation."""
    child = child_of(unit.saga.pk, stage.index)
    if child is None or child.status == SagaStatus.COMPENSATED:
        unit.move_step(
            stage,
            StepStatus.COMPENSATED,
            EventKind.STEP_COMPENSATED,
            {"child": str(child.pk)} if child else {},
            compensated_at=timezone.now(),
        )
        unit.progressed()
        finish_if_done(unit)
        unit.save(commit=True)
        return DONE
    if child.status == SagaStatus.FAILED and child.direction == Direction.BACKWARD:
        error = SafeError(
            "child_compensation_failed",
            f"The compensation of the child saga {child.name} stopped: {child.error_message}"[:500],
        )
        outcome = record_compensation_failure(
            unit, stage, error, give_up=True, detail={"child": str(child.pk)}
        )
        unit.save()
        return outcome
    if child.status != SagaStatus.COMPENSATING:
        with suppress(SagaBusy):  # a step of the child is running: next time
            _turn_back(child.pk, unit.saga.pk)
    return Outcome("retry", countdown=CHILD_POLL)


def abort_child(unit: Unit, stage: Any) -> None:
    """The parent turns back while its child is in flight: the child is aborted at once (its
    compensation begins), unless a step of it holds it (then the stage's compensation does
    it, in its turn)."""
    child = child_of(unit.saga.pk, stage.index)
    if child is not None and child.status not in FINAL_STATUSES:
        with suppress(SagaBusy):
            _turn_back(child.pk, unit.saga.pk)


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


BEGIN_STAGE["child"] = enter_child
COMPENSATE_STAGE["child"] = compensate_child
TURN_BACK_STAGE["child"] = abort_child
