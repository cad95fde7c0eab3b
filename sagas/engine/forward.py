"""Going forward: start a saga, run a step's attempt, record a failed one.

The attempt that fails for good records it in its own transaction, with what the saga does
next: pause for an operator, or compensate. The chain's error callback then only sends what
that decision says (`sagas.engine.callbacks`), and the sweeper does when the callback is lost.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import uuid4

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from ..definitions import SagaDefinition, StepContext, get_definition
from ..exceptions import CodeMissing, SagaKeyInFlight, StepError
from ..models import FINAL_STATUSES, ONE_IN_FLIGHT_PER_KEY, EventKind, Saga, SagaStep
from . import dispatch, groups, notify, waits
from .compensation import begin_compensation
from .rows import EventRow, StepRow, insert_saga, store_version
from .unit import (
    DONE,
    DUPLICATE,
    IN_PROGRESS,
    STOP,
    Outcome,
    SafeError,
    SagaStatus,
    StepStatus,
    Unit,
    chain_of,
    is_transient,
    lock,
    log_failure,
    policy_of,
    publish_or_leave_to_sweeper,
    resolve,
    safe_error,
    staff_detail,
    unexpected_error_policy,
)


def start(
    name: str,
    input: dict[str, Any],
    *,
    idempotency_key: str | None = None,
    created_by: Any = None,
    created_by_id: int | None = None,
    parent: tuple[Any, int] | None = None,
    parent_member: int | None = None,
) -> tuple[Saga, bool]:
    """Create the saga, its step rows and its first event in one statement; send the chain
    when the transaction commits. With an idempotency key already used, return that saga.

    Raises `SagaKeyError` if the definition's key is not in the input, and `SagaKeyInFlight`
    if the definition allows one saga in flight per key and one is. `parent`: the (saga id,
    stage) of the parent that starts this saga as its child (`sagas.engine.children`), and
    `parent_member` the position of the group member that starts it, if one does.
    """
    definition = get_definition(name)
    snapshots, version = definition.snapshot()
    now = timezone.now()
    options: dict[str, Any] = {
        "on_complete": definition.on_complete,
        "continue_compensation_on_failure": definition.continue_compensation_on_failure,
    }
    if definition.one_in_flight_per_key:
        options["one_in_flight_per_key"] = True  # the partial unique index's condition
    saga = Saga(
        id=uuid4(),
        name=name,
        # Created running when its first stage is a step (the chain is sent as the start
        # commits): the first step's write then changes no indexed column, and is a HOT
        # update. One that begins with a wait, a group or a child is pending until that
        # stage begins (`waits.begin`).
        status=SagaStatus.PENDING if definition.begins_with_a_wait else SagaStatus.RUNNING,
        input=input,
        business_key=definition.key_of(input),
        options=options,
        definition_version=version,
        epoch=1,  # its first chain's
        deadline_at=now + timedelta(seconds=definition.deadline) if definition.deadline else None,
        idempotency_key=idempotency_key,
        **({"created_by_id": created_by_id} if created_by_id else {"created_by": created_by}),
        parent_id=parent[0] if parent else None,
        parent_stage=parent[1] if parent else None,
        parent_member=parent_member,
        created_at=now,
        updated_at=now,
    )
    # The stages' definitions are stored once, as the version the saga names (`insert_saga`):
    # the stage rows hold none, and these know theirs as a read would (`SagaStep.definition`).
    steps = []
    for i, (stage, snapshot) in enumerate(zip(definition.steps, snapshots, strict=True)):
        step = SagaStep(saga=saga, index=i, name=stage.name)
        step.__dict__["stage_definition"] = snapshot
        steps.append(step)
    started = EventRow(
        saga.id, None, "", EventKind.SAGA_STARTED, {"steps": [s.name for s in steps]}, now
    )
    if notify.tracer is not None:
        saga.trace_context = notify.tracer.begin_saga(saga)
    store_version(version, name, snapshots, now)
    try:
        with transaction.atomic():
            inserted = insert_saga(
                saga,
                steps,
                started,
                commit=True,
                notice=notify.signalled([started]),
                definitions=snapshots,
            )
            if inserted is None:
                # The key was used, maybe by a request that committed a moment ago: its saga.
                return Saga.objects.get(name=name, idempotency_key=idempotency_key), False
            if definition.begins_with_a_wait:
                # In a transaction of its own once the start commits (the sweeper does it if
                # this process dies first).
                # A function, not a `partial`: Django logs a robust callback's failure by its
                # `__qualname__`, which a partial has not (Django ticket #36487).
                def begin(saga_id: Any = saga.id) -> None:
                    waits.begin(saga_id)

                transaction.on_commit(begin, robust=True)
            else:
                chain = chain_of(steps, 0)  # up to the first wait or group
                transaction.on_commit(
                    publish_or_leave_to_sweeper(
                        saga.id, lambda: dispatch.send_steps(str(saga.id), 1, chain, 0.0)
                    )
                )
            event_id, notice = inserted
            notify.on_commit(saga, [started], ids=[event_id], notice=notice)
    except IntegrityError as exc:
        constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
        if constraint != ONE_IN_FLIGHT_PER_KEY:
            raise
        # The same start, repeated at the same moment, may meet the other's business key
        # before its idempotency key: the other committed (the conflict waited for it), so
        # this is a repeat, and gets the first saga.
        if idempotency_key is not None:
            first = Saga.objects.filter(name=name, idempotency_key=idempotency_key).first()
            if first is not None:
                return first, False
        raise _in_flight(definition, saga.business_key) from None
    saga._state.adding = False
    saga._state.db = connection.alias
    return saga, True


def _in_flight(definition: SagaDefinition, key: str | None) -> SagaKeyInFlight:
    other = (
        Saga.objects.filter(name=definition.name, business_key=key)
        .exclude(status__in=FINAL_STATUSES)
        .values_list("pk", flat=True)
        .first()
    )
    return SagaKeyInFlight(
        f"A saga {definition.name} with the key {key!r} is in flight"
        + (f" ({other})" if other else "")
        + ": one at a time per key.",
        saga_id=other,
    )


def step_attempt(
    saga_id: str,
    index: int,
    *,
    epoch: int,
    fault: Any = None,
    bound: float | None = None,
    member: int | None = None,
) -> Outcome:
    """Run one attempt of a step (or of a group's `member`) and record its completion in the
    same transaction."""
    if member is not None:
        return groups.member_attempt(saga_id, index, member, epoch=epoch, fault=fault, bound=bound)
    with transaction.atomic():
        unit = lock(saga_id, bound=bound)
        saga, step = unit.saga, unit.steps[index]
        if step.status == StepStatus.COMPLETED:
            if not unit.is_current(epoch):
                return STOP  # a newer chain carries the saga on from here
            unit.event(EventKind.DUPLICATE_IGNORED, step, {"of": "action"})
            unit.save_events()
            return DUPLICATE
        if saga.status not in (SagaStatus.PENDING, SagaStatus.RUNNING) or saga.is_backward:
            return STOP
        if step.status not in IN_PROGRESS or unit.in_progress() is not step:
            return STOP  # an earlier step is not done: this message is stale
        if saga.status == SagaStatus.PENDING:
            # A saga started by a release that created sagas pending. (The start was recorded
            # when the saga was created.)
            unit.move_saga(SagaStatus.RUNNING, None)
        last = index + 1 == len(unit.steps)
        # Imported before anything runs: code a deploy removed pauses the saga, and the last
        # step does not run only for its `on_complete` to be found missing afterwards.
        action = resolve(step.definition["action"])
        on_complete_path = saga.options.get("on_complete") if last else None
        on_complete = resolve(on_complete_path) if on_complete_path else None
        started = step.started_at or timezone.now()
        ctx = unit.context(step)
        with unit.attempt(step):
            if fault is not None:
                fault.before_action()
            output = action(ctx)
            if fault is not None:
                fault.after_action()
        unit.attempt_completed(step, ctx.attempt, output, started)
        if not last and unit.stops_at(index + 1):
            waits.go_on(unit, index + 1)
        elif last:
            if on_complete is not None:
                outputs = unit.outputs_before(len(unit.steps))
                _ = on_complete(StepContext(saga.pk, "", saga.input, outputs, ctx.attempt))
            unit.move_saga(SagaStatus.COMPLETED, EventKind.SAGA_COMPLETED)
        else:
            unit.set_saga(current_step=index + 1)
        unit.save(commit=True)
    return DONE


def step_attempt_failed(
    saga_id: str, index: int, exc: BaseException, *, epoch: int, member: int | None = None
) -> Outcome:
    """Record a failed attempt: retry while the policy allows, or fail the step for good."""
    if member is not None:
        return groups.member_attempt_failed(saga_id, index, member, exc, epoch=epoch)
    with transaction.atomic():
        unit = lock(saga_id)
        step = unit.steps[index]
        if not attempt_may_fail(unit, step):
            return STOP
        reference = log_failure(unit, step, step.attempts + 1, exc)
        try:
            transient = _transient(step, exc)
        except CodeMissing as missing:  # a transient class the deploy removed
            exc, transient = missing, False
        error = safe_error(exc, time_limit=step.definition["time_limit"])
        detail = staff_detail(exc, reference)
        if isinstance(exc, CodeMissing):
            outcome = record_attempt_failure(unit, step, error, pause="code missing")
        elif transient or isinstance(exc, StepError):
            outcome = record_attempt_failure(unit, step, error, transient=transient, detail=detail)
        else:
            outcome = record_unexpected_failure(unit, step, error, detail=detail)
        unit.save()
    return outcome


def record_unexpected_failure(
    unit: Unit,
    step: StepRow,
    error: SafeError,
    *,
    detail: dict[str, Any],
    reason: str = "unexpected error",
) -> Outcome:
    """An error the step did not declare: what its policy says (`on_unexpected_error`)."""
    policy = unexpected_error_policy(step)
    if policy == "pause":
        return record_attempt_failure(unit, step, error, pause=reason, detail=detail)
    return record_attempt_failure(unit, step, error, transient=policy == "retry", detail=detail)


def attempt_may_fail(unit: Unit, step: StepRow) -> bool:
    # Whichever chain ran it (`epoch`), an attempt that happened is counted.
    saga = unit.saga
    running = saga.status in (SagaStatus.PENDING, SagaStatus.RUNNING) and not saga.is_backward
    return running and unit.in_progress() is step


def _transient(step: StepRow, exc: BaseException) -> bool:
    return is_transient(exc, policy_of(step, "retry"))


def record_attempt_failure(
    unit: Unit,
    step: StepRow,
    error: SafeError,
    *,
    transient: bool = False,
    pause: str = "",
    detail: dict[str, Any] | None = None,
) -> Outcome:
    """Count a failed attempt from the rows; retry it, or fail the step and decide what next.

    A business error is never retried. A transient one is, until the step's attempts (the
    rows' count, whichever message ran them) reach its policy's `max_attempts`. With `pause`
    (why), the step fails at once and the saga waits for an operator: an error the step did
    not declare, or code that a deploy removed. `detail` is what staff see of the error.
    """
    extra = detail or {}
    policy = policy_of(step, "retry")
    attempt = step.attempts + 1
    values: dict[str, Any] = {
        "attempts": attempt,
        "error_code": error.code,
        "error_message": error.message,
        "started_at": step.started_at or timezone.now(),
    }
    if unit.saga.status == SagaStatus.PENDING:
        unit.move_saga(SagaStatus.RUNNING, None)
    unit.set_saga(current_step=step.index)
    if transient and not pause and attempt < policy.max_attempts:
        countdown = policy.countdown(attempt)
        retrying = {**error.as_dict(), "attempt": attempt, "retry_in_s": round(countdown, 3)}
        unit.move_step(
            step, StepStatus.RUNNING, EventKind.STEP_RETRYING, {**retrying, **extra}, **values
        )
        return Outcome("retry", countdown=countdown, error=error)
    unit.move_step(
        step,
        StepStatus.FAILED,
        EventKind.STEP_FAILED,
        {**error.as_dict(), "attempt": attempt, "exhausted": transient, **extra},
        finished_at=timezone.now(),
        **values,
    )
    unit.set_saga(error_code=error.code, error_message=error.message)
    if not pause and transient and step.definition.get("on_exhausted") == "pause":
        pause = "paused by policy"
    if pause or unit.passed_pivot():
        reason = pause or "failed after the pivot"
        unit.move_saga(
            SagaStatus.FAILED, EventKind.SAGA_PAUSED, {"step": step.name, "reason": reason}
        )
    else:
        # The error callback sends the compensations (or the sweeper, if it is lost).
        begin_compensation(unit, EventKind.COMPENSATION_STARTED, send=False)
    return Outcome("fail", error=error)
