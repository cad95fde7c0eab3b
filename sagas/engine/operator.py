"""Operator actions: retry, compensate, resolve, skip; each with a plan shown before it is
done.

They wait a few seconds at most for a saga whose step is running (`SagaBusy` after that),
so an operator's request never hangs behind a slow or hung step.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from .. import conf
from ..definitions import (
    PAYLOAD_MAX_BYTES,
    StepContext,
    import_callable,
    is_child,
    is_group,
    is_wait,
)
from ..exceptions import InvalidTransition
from ..models import EventKind, OperatorAction, SagaStep
from . import reconcile, waits
from .compensation import (
    FENCE_MARGIN,
    begin_compensation,
    finish_if_done,
    member_compensated,
    resume_members,
)
from .unit import (
    IN_PROGRESS,
    STOP_CODES,
    SagaStatus,
    StepStatus,
    Unit,
    claim_members,
    lock,
    peek,
)

# Seconds an operator action waits for a saga locked by a running step.
LOCK_WAIT = 5.0


@dataclass(frozen=True)
class Plan:
    """What an operator action will do, shown before it is done."""

    action: OperatorAction | str
    allowed: bool
    reason: str = ""
    run: tuple[str, ...] = ()
    undo: tuple[str, ...] = ()


class Keep(enum.Enum):
    """A retry's deadline left as it is (`retry(deadline=KEEP)`)."""

    KEEP = "keep"


KEEP = Keep.KEEP
#: What a retry does to the saga's deadline: KEEP it (one that passed while the saga waited is
#: cleared), None to clear it, or a new one.
Deadline = datetime | None | Keep


def plan_retry(unit: Unit, deadline: Deadline = KEEP) -> Plan:
    saga = unit.saga
    if saga.status != SagaStatus.FAILED:
        return Plan(
            OperatorAction.RETRY, False, f"Only a failed saga can be retried (it is {saga.status})."
        )
    if saga.is_backward:
        if deadline is not KEEP:
            return Plan(
                OperatorAction.RETRY,
                False,
                "It resumes its compensation: it has no deadline to change.",
            )
        return Plan(
            OperatorAction.RETRY,
            True,
            "Resume the compensation.",
            undo=unit.undo_names(unit.owed_on_resume()),
        )
    step = unit.in_progress()
    assert step is not None, "a failed saga going forward has a step to run"
    if isinstance(deadline, datetime) and deadline <= timezone.now():
        return Plan(OperatorAction.RETRY, False, "The new deadline has already passed.")
    if deadline is not KEEP and unit.passed_pivot():
        return Plan(
            OperatorAction.RETRY,
            False,
            "It passed its pivot: a deadline no longer applies to it.",
        )
    reason = "Resume from the failed step." + _deadline_words(unit, deadline)
    return Plan(OperatorAction.RETRY, True, reason, run=unit.run_names(unit.steps[step.index :]))


def _deadline_words(unit: Unit, deadline: Deadline) -> str:
    """What the retry does to the saga's deadline, in the plan's words."""
    current = unit.saga.deadline_at
    if unit.passed_pivot():
        return ""  # past its pivot, a saga is no longer compensated for its deadline
    if isinstance(deadline, datetime):
        return f" Its deadline is set to {deadline.isoformat(timespec='seconds')}."
    if deadline is None:
        return " Its deadline is cleared." if current is not None else ""
    if _deadline_passed(unit):
        return " Its deadline passed while it waited: the retry clears it."
    if current is not None:
        return (
            f" Its deadline, {current.isoformat(timespec='seconds')}, still holds: past it, "
            "the saga is compensated."
        )
    return ""


def _deadline_passed(unit: Unit) -> bool:
    deadline = unit.saga.deadline_at
    return deadline is not None and deadline <= timezone.now() and not unit.passed_pivot()


def plan_compensate(unit: Unit) -> Plan:
    saga = unit.saga
    if saga.status not in (
        SagaStatus.RUNNING,
        SagaStatus.PENDING,
        SagaStatus.WAITING,
        SagaStatus.FAILED,
    ):
        if saga.status == SagaStatus.COMPENSATING:
            return Plan(OperatorAction.COMPENSATE, False, "The saga is already compensating.")
        return Plan(
            OperatorAction.COMPENSATE, False, f"A {saga.status} saga cannot be compensated."
        )
    if saga.is_backward:
        why = "The saga failed while compensating: retry resumes its compensation."
        return Plan(OperatorAction.COMPENSATE, False, why)
    owed = unit.owed_on_compensation()
    reason = "Abort and undo the completed steps."
    current = unit.in_progress()
    if current is not None and current in owed and current.status in IN_PROGRESS:
        wait = int(current.definition["time_limit"]) + conf.hard_time_limit_grace() + FENCE_MARGIN
        reason += (
            f" {current.name} may have an attempt running: its compensation waits up to "
            f"{wait} s, until that attempt cannot be running any more."
        )
    return Plan(OperatorAction.COMPENSATE, True, reason, undo=unit.undo_names(owed))


def plan_resolve(unit: Unit, index: int, member: int | None = None) -> Plan:
    if not 0 <= index < len(unit.steps):
        return Plan(OperatorAction.RESOLVE, False, "No such step.")
    step: Any = unit.steps[index]
    if member is not None:
        step = unit.member(index, member)
        if step is None:
            return Plan(OperatorAction.RESOLVE, False, "No such member of a group.")
    if unit.saga.status != SagaStatus.FAILED or step.status != StepStatus.COMPENSATION_FAILED:
        return Plan(
            OperatorAction.RESOLVE, False, "Only a step whose compensation failed can be resolved."
        )
    if member is not None:
        rest = tuple(n for n in unit.undo_names(unit.owed_on_resume()) if n != step.title)
        name = step.title
    else:
        rest = unit.undo_names([s for s in unit.owed_on_resume() if s.index != index])
        name = step.name
    return Plan(OperatorAction.RESOLVE, True, f"Mark {name} as compensated by hand.", undo=rest)


def plan_skip(unit: Unit, index: int, member: int | None = None) -> Plan:
    """Marking stage `index` as done by hand: a wait that waits, or the stage a saga paused
    at going forward (a step that failed for good, a wait that timed out or failed); or, with
    `member`, a failed member of the group a saga paused at."""
    if member is not None:
        return _plan_skip_member(unit, index, member)
    if not 0 <= index < len(unit.steps):
        return Plan(OperatorAction.SKIP, False, "No such stage.")
    saga, stage = unit.saga, unit.steps[index]
    if stage.definition.get("approval"):
        why = "An approval is decided, not skipped: approve or reject it."
        return Plan(OperatorAction.SKIP, False, why)
    if stage.definition.get("kind") == "child" and stage.status == StepStatus.WAITING:
        why = "A child stage ends with its child saga: act on the child (its page is linked)."
        return Plan(OperatorAction.SKIP, False, why)
    running = [
        m.title
        for m in (unit.members(index) if is_group(stage.definition) else [])
        if m.status == StepStatus.RUNNING and is_child(m.definition)
    ]
    if running:
        why = (
            f"A child member's child saga is in flight ({', '.join(running)}): it ends with "
            "its child; act on the child (its page is linked), or skip the failed members."
        )
        return Plan(OperatorAction.SKIP, False, why)
    waiting = saga.status == SagaStatus.WAITING and stage.status == StepStatus.WAITING
    paused = (
        saga.status == SagaStatus.FAILED
        and not saga.is_backward
        and stage.status == StepStatus.FAILED
        and unit.in_progress() is stage
    )
    if not (waiting or paused):
        why = "Only a waiting stage, or the failed stage a paused saga stopped at, can be skipped."
        return Plan(OperatorAction.SKIP, False, why)
    reason = f"Mark {stage.name} as done with the output given; the saga goes on from there."
    return Plan(OperatorAction.SKIP, True, reason, run=unit.run_names(unit.steps[index + 1 :]))


def _plan_skip_member(unit: Unit, index: int, position: int) -> Plan:
    stage = unit.steps[index] if 0 <= index < len(unit.steps) else None
    member = unit.member(index, position) if stage is not None else None
    if member is None:
        return Plan(OperatorAction.SKIP, False, "No such member of a group.")
    saga = unit.saga
    paused = (
        saga.status == SagaStatus.FAILED
        and not saga.is_backward
        and unit.in_progress() is stage
        and member.status == StepStatus.FAILED
    )
    if not paused:
        why = "Only a failed member of the group a paused saga stopped at can be skipped."
        return Plan(OperatorAction.SKIP, False, why)
    members = unit.members(index)
    others = [m.title for m in members if m.status == StepStatus.FAILED and m is not member]
    reason = f"Mark {member.title} as done with the output given; "
    if others:
        reason += (
            f"the saga stays paused: {', '.join(others)} failed too (skip them, or retry "
            "the saga to run them again)."
        )
        return Plan(OperatorAction.SKIP, True, reason)
    rest = [m.title for m in members if m.status in IN_PROGRESS]
    reason += "the group goes on" + (" with its members not yet run." if rest else ".")
    return Plan(
        OperatorAction.SKIP, True, reason, run=(*rest, *unit.run_names(unit.steps[index + 1 :]))
    )


def _skip_member(unit: Unit, stage: Any, position: int, output: Any, detail: dict) -> None:
    """A failed member marked as done by hand: the group goes on once none failed."""
    member = unit.member(stage.index, position)
    assert member is not None
    claim_members([member])
    unit.move_step(
        member,
        StepStatus.COMPLETED,
        EventKind.OPERATOR_SKIP,
        detail,
        output=output,
        finished_at=timezone.now(),
        error_code="",
        error_message="",
    )
    unit.progressed()
    if any(m.status == StepStatus.FAILED for m in unit.members(stage.index)):
        return  # the saga stays paused for the others
    unit.set_saga(recovery_attempts=0, error_code="", error_message="")
    unit.move_step(stage, StepStatus.PENDING, None, error_code="", error_message="")
    unit.move_saga(SagaStatus.RUNNING, None)
    waits.go_on(unit, stage.index)


def _resume_compensation(unit: Unit, kind: str, detail: dict) -> None:
    for step in unit.owed_on_resume():
        if step.status == StepStatus.COMPENSATION_FAILED:  # a new budget: the operator's decision
            unit.move_step(step, StepStatus.COMPENSATING, None, compensation_attempts=0)
        elif step.status != StepStatus.COMPENSATING:  # never reached before the compensation halted
            unit.move_step(step, StepStatus.COMPENSATING, None)
    resume_members(unit)
    unit.restore_cause()
    unit.move_saga(SagaStatus.COMPENSATING, kind, detail)
    if unit.to_compensate():
        unit.set_saga(current_step=unit.to_compensate()[0].index)
        unit.send_compensations()
    else:
        finish_if_done(unit)


def _by(actor: str, bulk_action_id: int | None) -> dict[str, str | int]:
    """Who acted, for the timeline: the operator, and the bulk action it was part of, if any."""
    detail: dict[str, str | int] = {"actor": actor}
    if bulk_action_id is not None:
        detail["bulk_action"] = bulk_action_id
    return detail


# Whether the saga still matches what a bulk action selected (its filter), asked under the
# saga's lock: a saga may change while the action waits for it.
Matches = Callable[[], bool]
NO_LONGER_MATCHES = "The saga no longer matches the filter."


def _still_matches(matches: Matches | None) -> None:
    if matches is not None and not matches():
        raise InvalidTransition(NO_LONGER_MATCHES)


def _allowed(plan: Plan) -> Plan:
    if not plan.allowed:
        raise InvalidTransition(plan.reason)
    return plan


def retry(
    saga_id: UUID | str,
    *,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Matches | None = None,
    deadline: Deadline = KEEP,
) -> Plan:
    """Resume a failed saga where it stopped, in its direction, without redoing done work.
    `deadline`: see `Deadline`; a new one must be in the future."""
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT)
        _still_matches(matches)
        plan = _allowed(plan_retry(unit, deadline))
        unit.set_saga(recovery_attempts=0)  # an operator took over: recovery starts afresh
        if unit.saga.is_backward:
            _resume_compensation(unit, EventKind.OPERATOR_RETRY, _by(actor, bulk_action_id))
        else:
            step = unit.in_progress()
            assert step is not None
            detail: dict[str, Any] = {**_by(actor, bulk_action_id), "from": step.name}
            if deadline is not KEEP:
                if unit.saga.deadline_at is not None:
                    detail["deadline_before"] = unit.saga.deadline_at.isoformat()
                detail["deadline"] = deadline.isoformat() if deadline is not None else None
                unit.set_saga(deadline_at=deadline)
            elif _deadline_passed(unit):
                # The operator chose to go on: the sweeper would otherwise compensate the
                # saga as soon as it runs again (`sagas.engine.recovery.deadline_passed`).
                detail["deadline_cleared"] = unit.saga.deadline_at.isoformat()
                unit.set_saga(deadline_at=None)
            if (
                step.status == StepStatus.FAILED
            ):  # a new budget of attempts: the operator's decision
                detail["attempts_before"] = step.attempts
                unit.move_step(
                    step,
                    StepStatus.PENDING,
                    None,
                    finished_at=None,
                    attempts=0,
                    error_code="",
                    error_message="",
                )
            unit.set_saga(current_step=step.index, error_code="", error_message="")
            unit.move_saga(SagaStatus.RUNNING, EventKind.OPERATOR_RETRY, detail)
            waits.go_on(unit, step.index)
        unit.save()
    return plan


def compensate(
    saga_id: UUID | str,
    *,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Matches | None = None,
) -> Plan:
    """Abort a running or failed saga and compensate its completed steps in reverse order."""
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT)
        _still_matches(matches)
        plan = _allowed(plan_compensate(unit))
        unit.set_saga(recovery_attempts=0)
        if unit.saga.error_code in STOP_CODES:  # why it stopped; it compensates for the abort
            unit.set_saga(error_code="", error_message="")
        begin_compensation(unit, EventKind.OPERATOR_COMPENSATE, _by(actor, bulk_action_id))
        unit.save()
    return plan


def resolve(saga_id: UUID | str, index: int, *, actor: str = "", member: int | None = None) -> Plan:
    """Mark a step (or a group's `member`) whose compensation failed as handled by hand;
    continue the compensation."""
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT)
        plan = _allowed(plan_resolve(unit, index, member))
        step: Any = unit.steps[index] if member is None else unit.member(index, member)
        if member is not None:
            claim_members([step])
        unit.move_step(
            step,
            StepStatus.COMPENSATED,
            EventKind.OPERATOR_RESOLVE,
            {"actor": actor},
            compensated_at=timezone.now(),
        )
        if member is not None:
            member_compensated(unit, step)
        unit.set_saga(error_code="", error_message="", recovery_attempts=0)
        _resume_compensation(unit, EventKind.COMPENSATION_STARTED, {"actor": actor})
        unit.save()
    return plan


def check_output(saga_id: UUID | str, index: int, output: Any, member: int | None = None) -> None:
    """Refuse an output stage `index` would not take (Django's `ValidationError`, on
    `output`): text PostgreSQL cannot store, larger than the stage's payload limit, or refused
    by a wait's `validate`. Run before the saga is locked: `validate` is the project's."""
    definition = (
        SagaStep.objects.filter(saga_id=saga_id, index=index)
        .with_definition()
        .values_list("stage_definition", flat=True)
        .first()
    )
    if definition is None:
        return  # no such stage: the plan says so
    if not waits._storable(output):
        raise ValidationError(
            {"output": "Text with a NUL character or a lone surrogate cannot be stored."}
        )
    limit = int(definition.get("max_payload_bytes") or PAYLOAD_MAX_BYTES)
    size = len(json.dumps(output, separators=(",", ":"), cls=DjangoJSONEncoder).encode())
    if size > limit:
        raise ValidationError({"output": f"At most {limit} bytes of JSON (this is {size})."})
    if member is None and is_wait(definition) and definition.get("validate"):
        try:
            import_callable(definition["validate"])(output)
        except ValidationError as error:
            raise ValidationError({"output": error.messages}) from None


def skip(
    saga_id: UUID | str,
    index: int,
    *,
    output: Any = None,
    actor: str = "",
    note: str = "",
    bulk_action_id: int | None = None,
    matches: Matches | None = None,
    member: int | None = None,
) -> Plan:
    """Mark stage `index` (or the group's `member` there) as done by hand with `output`
    (which later stages read as its output), and go on from there. Check the output first
    (`check_output`)."""
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT)
        _still_matches(matches)
        plan = _allowed(plan_skip(unit, index, member))
        stage = unit.steps[index]
        detail: dict[str, Any] = {**_by(actor, bulk_action_id), "note": note}
        if member is not None:
            _skip_member(unit, stage, member, output, detail)
            unit.save()
            return plan
        if _deadline_passed(unit):  # the operator chose to go on, as a retry does
            detail["deadline_cleared"] = unit.saga.deadline_at.isoformat()
            unit.set_saga(deadline_at=None)
        waits.refuse_kept(unit, stage, "Its wait was marked as done by hand.")
        unit.move_step(
            stage,
            StepStatus.COMPLETED,
            EventKind.OPERATOR_SKIP,
            detail,
            output=output,
            finished_at=timezone.now(),
            due_at=None,
            error_code="",
            error_message="",
        )
        unit.set_saga(recovery_attempts=0, error_code="", error_message="")
        unit.progressed()
        if index + 1 == len(unit.steps):
            _complete(unit)
        else:
            unit.move_saga(SagaStatus.RUNNING, None)
            waits.go_on(unit, index + 1)
        unit.save()
    return plan


def _complete(unit: Unit) -> None:
    """The last stage was marked as done: the saga completes, with its `on_complete`."""
    path = unit.saga.options.get("on_complete")
    if path:
        outputs = unit.outputs_before(len(unit.steps))
        try:
            on_complete = import_callable(path)
            on_complete(StepContext(unit.saga.pk, "", unit.saga.input, outputs, 1))
        except Exception as exc:  # the project's code: the skip is not done
            raise InvalidTransition(
                f"The saga's on_complete raised {type(exc).__name__}: nothing was changed."
            ) from None
    unit.move_saga(SagaStatus.COMPLETED, EventKind.SAGA_COMPLETED)


def plan_reconcile(unit: Unit) -> Plan:
    """Running the saga's reconciliation check now (`sagas.engine.reconcile`)."""
    why = reconcile.why_not(unit)
    if why:
        return Plan(OperatorAction.RECONCILE, False, why)
    reason = (
        f"Run the reconciliation check of {unit.saga.name} now: discrepancies flag the saga, "
        "an agreeing check clears its flag; its status stays what it is."
    )
    return Plan(OperatorAction.RECONCILE, True, reason)


def reconcile_now(
    saga_id: UUID | str,
    *,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Matches | None = None,
) -> Plan:
    """Run a final saga's reconciliation check now, as an operator (or a bulk action) asks."""
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT)
        _still_matches(matches)
        plan = _allowed(plan_reconcile(unit))
        reconcile.check_locked(unit, by=_by(actor, bulk_action_id))
    return plan


def plan_repair(unit: Unit, index: int) -> Plan:
    """Running the compensation of step `index` again, as a discrepancy's repair offers."""
    allowed, reason = reconcile.repair_plan(unit, index)
    undo = (unit.steps[index].name,) if allowed else ()
    return Plan(OperatorAction.REPAIR, allowed, reason, undo=undo)


def repair(saga_id: UUID | str, index: int, *, actor: str = "") -> Plan:
    """Run the repair of step `index` a discrepancy offers: a worker runs the step's
    compensation again once this commits, records it, and checks again."""
    reason = reconcile.request_repair(saga_id, index, actor=actor)  # planned under its lock
    return Plan(OperatorAction.REPAIR, True, reason, undo=(reconcile.step_name(saga_id, index),))


def plan(
    saga_id: UUID | str,
    action: str,
    index: int | None = None,
    *,
    locked: bool = True,
    deadline: Deadline = KEEP,
    member: int | None = None,
) -> Plan:
    """Preview an operator action without doing it (`member`: a skip's, of a group's member).

    Not `locked`: from the rows as they are, without waiting for a running step (a bulk
    action's preview, of many sagas); the action's own plan, under the lock, has the last word.
    """
    with transaction.atomic():
        unit = lock(saga_id, wait=LOCK_WAIT) if locked else peek(saga_id)
        if action == OperatorAction.RETRY:
            return plan_retry(unit, deadline)
        if action == OperatorAction.COMPENSATE:
            return plan_compensate(unit)
        if action == OperatorAction.RESOLVE and index is not None:
            return plan_resolve(unit, index, member)
        if action == OperatorAction.SKIP and index is not None:
            return plan_skip(unit, index, member)
        if action == OperatorAction.RECONCILE:
            return plan_reconcile(unit)
        if action == OperatorAction.REPAIR and index is not None:
            return plan_repair(unit, index)
    raise InvalidTransition(f"unknown action {action!r}")
