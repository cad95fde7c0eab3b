"""Groups: stages whose members run at the same time, joined in PostgreSQL.

A chain of steps ends at a group (`unit.chain_of`). The transaction that reaches it begins it
(`enter_group`): its members' rows are made (a map's: one per item, computed then), the group's
row becomes `running`, and each member is sent as a task of its own (up to the group's
`concurrency`).

A member's attempt locks **its own row** for the whole attempt, not the saga's: the members of
a group run at the same time. It takes the saga's lock only to record its outcome, in the same
transaction as its action's own writes. The lock order is always the member's row, then the
saga's; whoever holds the saga's lock takes a member's only with `SKIP LOCKED`, and so never
waits for a member that waits for the saga.

The join: the member whose commit completes the group (every member completed, or failed
within a map's tolerance) sends the rest of the saga, under the saga's lock: two members
finishing together are serialised by it, and only the last sees the group complete. If that
send is lost after the commit, the sweeper sends the rest from the rows, as for any lost
message.

A member that fails for good (beyond the tolerance) fails the group: its transaction records
what the saga does next (pause, or compensate), as a step's does. A saga that turned back
starts no member (each checks the saga's direction before its action). The compensation of a
group begins with its settling (`settle`): it waits until no member's attempt is running (their
rows are locked), then marks what is owed: the members that completed, and those that may have
started where their definition says `compensate_failed_step`. Then they are compensated one at
a time, last first, and the stages before the group after them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import transaction
from django.utils import timezone

from ..definitions import MEMBER_NAME_MAX_LENGTH, import_callable, is_child
from ..exceptions import CodeMissing, StepError
from ..models import EventKind, SagaMember
from . import dispatch
from .compensation import begin_compensation
from .unit import (
    BEGIN_STAGE,
    DONE,
    IN_PROGRESS,
    START_MEMBER,
    STOP,
    Outcome,
    SafeError,
    SagaStatus,
    StageNotBegun,
    StepStatus,
    Unit,
    attach,
    claim_members,
    free_members,
    is_transient,
    lock,
    lock_member,
    lock_with_members,
    log_failure,
    peek_at_member,
    policy_of,
    resolve,
    safe_error,
    staff_detail,
    unexpected_error_policy,
)

logger = logging.getLogger("sagas")


# -- beginning a group ----------------------------------------------------------------------


def enter_group(unit: Unit, stage: Any) -> None:
    """Begin the group at `stage`, or go on with it (a recovery, an operator's retry): make
    its members' rows if it has none, and send those that have not completed."""
    unit.set_saga(current_step=stage.index)
    if unit.saga.status != SagaStatus.RUNNING:
        unit.move_saga(SagaStatus.RUNNING, None)
    members = unit.members(stage.index)
    now = timezone.now()
    if not members:
        try:
            members = _make(unit, stage)
        except StageNotBegun as exc:
            unit.stage_not_begun(stage, exc.error)
            return
        except Exception as exc:  # the project's `items` or `key`: a bug of its own
            logger.warning(
                "The group %s of saga %s could not begin: %s",
                stage.name,
                unit.saga.pk,
                type(exc).__name__,
            )
            message = f"The group's items or key raised {type(exc).__name__}; fix it and retry."
            unit.stage_not_begun(stage, SafeError("group_not_begun", message))
            return
        if not members:  # an empty map: done at once
            unit.move_step(stage, StepStatus.RUNNING, None, started_at=now)
            _complete(unit, stage)
            return
    else:
        failed = [m for m in members if m.status == StepStatus.FAILED]
        claim_members(failed)  # an operator's retry: busy while a late message holds one
        for member in failed:  # an operator's retry: a new budget
            unit.move_step(
                member,
                StepStatus.PENDING,
                None,
                attempts=0,
                finished_at=None,
                error_code="",
                error_message="",
            )
    if stage.status != StepStatus.RUNNING:
        unit.move_step(
            stage,
            StepStatus.RUNNING,
            None,
            started_at=stage.started_at or now,
            finished_at=None,
            error_code="",
            error_message="",
        )
    if not any(m.status in IN_PROGRESS for m in members):
        _complete(unit, stage)  # every member done (an operator marked the last one so)
        return
    epoch = unit._next_epoch()
    _send(unit, stage, epoch, resend=True)


def _make(unit: Unit, stage: Any) -> list[SagaMember]:
    """Make the group's members' rows: its listed members, or one per item of its map."""
    definition = stage.definition
    mapped = definition.get("map")
    if mapped is None:
        specs: list[tuple[str, Any]] = [(m["name"], None) for m in definition["members"]]
    else:
        items = import_callable(mapped["items"])(unit.context(stage))
        if not isinstance(items, list | tuple):
            raise StageNotBegun(
                "group_items_invalid",
                f"The group's items must be a list, not {type(items).__name__}.",
            )
        if len(items) > int(mapped["max_fan_out"]):
            raise StageNotBegun(
                "group_fan_out_exceeded",
                f"The group has {len(items)} items, more than its maximum of "
                f"{mapped['max_fan_out']}.",
            )
        try:
            json.dumps(list(items), cls=DjangoJSONEncoder)
        except (TypeError, ValueError):
            raise StageNotBegun(
                "group_items_invalid", "The group's items must be JSON-serialisable."
            ) from None
        key = import_callable(mapped["key"]) if mapped.get("key") else None
        specs = [(_item_key(item, position, key), item) for position, item in enumerate(items)]
        names = [name for name, _ in specs]
        if len(set(names)) != len(names):
            raise StageNotBegun(
                "group_items_invalid", "Two of the group's items have the same key."
            )
    members = [
        SagaMember(saga_id=unit.saga.pk, stage=stage.index, position=position, name=name, item=item)
        for position, (name, item) in enumerate(specs)
    ]
    SagaMember.objects.bulk_create(members)
    for member in members:
        attach(member, stage)
    unit.members(stage.index)  # read the other groups' first, then add this one's
    assert unit._members is not None
    unit._members[stage.index] = members
    return members


def _item_key(item: Any, position: int, key: Any) -> str:
    """The name of a map's member: its key (`key(item)`), the item itself (a string or an
    integer), or its position."""
    if key is not None:
        value = key(item)
    elif isinstance(item, str | int) and not isinstance(item, bool):
        value = item
    else:
        value = position
    name = str(value)
    if not name or len(name) > MEMBER_NAME_MAX_LENGTH or ":" in name:
        raise StageNotBegun(
            "group_items_invalid",
            f"An item's key must have 1 to {MEMBER_NAME_MAX_LENGTH} characters and no ':'.",
        )
    return name


def _send(unit: Unit, stage: Any, epoch: int, *, resend: bool, countdown: float = 0.0) -> None:
    """Send the group's members that are due, up to its concurrency: with `resend`, those
    already sent too (a recovery: a duplicate is harmless)."""
    members = unit.members(stage.index)
    limit = stage.definition.get("concurrency") or len(members)
    running = [m for m in members if m.status == StepStatus.RUNNING]
    pending = [m for m in members if m.status == StepStatus.PENDING]
    room = max(limit - len(running), 0)
    sending = (running if resend else []) + pending[:room]
    children = [m for m in sending if is_child(m.definition)]
    if children:
        # A child member runs no task: its child saga runs, and tells it when it ends
        # (`member_child_ended`); one already started is left to it.
        sending = [m for m in sending if m not in children]
        starting = [m for m in children if m.status == StepStatus.PENDING]
        if not _start_children(unit, stage, starting, epoch):
            return  # one could not begin: the group failed, and no other member is sent
    # Only the rows no one holds are changed: a member whose attempt runs holds its row, and
    # waits for the saga's lock, held here; it is in flight, and needs no message. A pending
    # member's row held (a late callback, a duplicate: both let go at once) is sent as it is,
    # under its row's epoch, its row unchanged: nothing else would send it.
    free = free_members(sending)
    held = [m for m in sending if m.pk not in free and m.status == StepStatus.PENDING]
    sending = [m for m in sending if m.pk in free]
    for member in sending:
        # Running: sent (or between attempts). Its epoch names its task, and its callback's.
        unit.move_step(member, StepStatus.RUNNING, None, epoch=epoch)
    saga_id = str(unit.saga.pk)
    by_epoch: dict[int, list[tuple[int, int]]] = {}
    for member in [*sending, *held]:
        sent_epoch = epoch if member in sending else member.epoch
        by_epoch.setdefault(sent_epoch, []).append(
            (member.position, int(member.definition["time_limit"]))
        )
    for sent_epoch, members_sent in by_epoch.items():
        unit.after_commit.append(_sender(saga_id, sent_epoch, stage.index, members_sent, countdown))


def _start_children(unit: Unit, stage: Any, members: list[SagaMember], epoch: int) -> bool:
    """Start the child sagas of the group's child `members` (pending), in this transaction;
    false if one could not begin (its member fails for good, and its saga pauses, as a child
    stage's does)."""
    free = free_members(members)  # a late message of an older child holds one: next time
    now = timezone.now()
    for member in (m for m in members if m.pk in free):
        try:
            child = START_MEMBER[member.definition["kind"]](unit, member)
        except StageNotBegun as exc:
            record_member_failure(unit, member, exc.error, pause=exc.error.code)
            return False
        unit.move_step(
            member,
            StepStatus.RUNNING,
            EventKind.CHILD_STARTED,
            {"child": str(child.pk), "saga": child.name},
            epoch=epoch,
            started_at=member.started_at or now,
            finished_at=None,
            error_code="",
            error_message="",
        )
    return True


def _sender(
    saga_id: str, epoch: int, index: int, members: list[tuple[int, int]], countdown: float
) -> Callable[[], None]:
    def send() -> None:
        dispatch.send_members(saga_id, epoch, index, members, countdown)

    return send


def _complete(unit: Unit, stage: Any) -> None:
    """Every member completed (or failed within the map's tolerance): the group completes, its
    output the members' (by name; a map's, a list in the items' order), and the saga goes on."""
    members = unit.members(stage.index)
    failed = [m.name for m in members if m.status == StepStatus.FAILED]
    output: Any
    if "map" in stage.definition:
        output = [m.output if m.status == StepStatus.COMPLETED else None for m in members]
    else:
        output = {m.name: m.output for m in members}
    detail: dict[str, Any] = {"members": len(members)}
    if failed:
        detail["tolerated"] = failed
    unit.move_step(
        stage,
        StepStatus.COMPLETED,
        EventKind.STEP_COMPLETED,
        detail,
        output=output,
        finished_at=timezone.now(),
        error_code="",
        error_message="",
    )
    unit.progressed()
    unit.go_on(stage.index + 1)


def after_member(unit: Unit, stage: Any) -> None:
    """A member ended (completed, or failed within the tolerance) while its group runs: the
    group completes if it was the last, or the next member is sent (its concurrency)."""
    members = unit.members(stage.index)
    if any(m.status in IN_PROGRESS for m in members):
        if stage.definition.get("concurrency"):
            _send(unit, stage, unit.saga.epoch, resend=False)
        return
    _complete(unit, stage)


def going(unit: Unit, stage: Any) -> bool:
    saga = unit.saga
    return (
        saga.status == SagaStatus.RUNNING
        and not saga.is_backward
        and stage.status == StepStatus.RUNNING
    )


# -- a member's attempt ------------------------------------------------------------------------


def member_attempt(
    saga_id: str,
    index: int,
    position: int,
    *,
    epoch: int,
    fault: Any = None,
    bound: float | None = None,
) -> Outcome:
    """Run one attempt of a member, holding its row's lock, and record it under the saga's.
    Its round trips: its row's lock with the saga and steps as they are (`peek_at_member`),
    its action, the saga's lock with the members (`lock_with_members`), the writes with the
    COMMIT; a step's, one fewer."""
    with transaction.atomic():
        # As they are: the saga's lock is taken to record the outcome only.
        row, seen = peek_at_member(saga_id, index, position, bound=bound)
        if row is None:
            return STOP
        if row.status not in IN_PROGRESS:
            if row.status == StepStatus.COMPLETED and row.epoch == epoch:
                # Delivered again after its commit (its acknowledgement lost): on the timeline.
                member = attach(row, seen.steps[index])
                seen.event(EventKind.DUPLICATE_IGNORED, member, {"of": "action"})
                seen.save_events()
            return STOP  # done (a duplicate delivery), or settled
        stage = seen.steps[index]
        if not going(seen, stage):
            return STOP  # the saga turned back, paused, or moved on: no member starts
        member = attach(row, stage)
        if is_child(member.definition):
            return STOP  # a child member runs no action (a message of another version)
        action = resolve(member.definition["action"])
        started = member.started_at or timezone.now()
        ctx = seen.context(member)
        with seen.attempt(member):
            if fault is not None:
                fault.before_action()
            output = action(ctx)
            if fault is not None:
                fault.after_action()
        unit = lock_with_members(saga_id)
        recorded = unit.member(index, position)
        assert recorded is not None and recorded.status in IN_PROGRESS, "its row is locked"
        unit.attempt_completed(recorded, ctx.attempt, output, started)
        stage = unit.steps[index]
        if going(unit, stage):
            after_member(unit, stage)
        # Else the saga paused or turned back while it ran: it is recorded, and a
        # compensation's settling finds it completed.
        unit.save(commit=True)
    return DONE


def member_attempt_failed(
    saga_id: str, index: int, position: int, exc: BaseException, *, epoch: int
) -> Outcome:
    """Record a member's failed attempt: retry while its policy allows, or fail it for good."""

    with transaction.atomic():
        row = lock_member(saga_id, index, position)
        if row is None or row.status not in IN_PROGRESS:
            return STOP  # before the saga's lock: one who holds it may be settling this row
        unit = lock(saga_id)
        member = unit.member(index, position)
        if member is None or member.status not in IN_PROGRESS:
            return STOP
        reference = log_failure(unit, member, member.attempts + 1, exc)
        try:
            transient = is_transient(exc, policy_of(member, "retry"))
        except CodeMissing as missing:
            exc, transient = missing, False
        error = safe_error(exc, time_limit=member.definition["time_limit"])
        detail = staff_detail(exc, reference)
        if isinstance(exc, CodeMissing):
            outcome = record_member_failure(unit, member, error, pause="code missing")
        elif transient or isinstance(exc, StepError):
            outcome = record_member_failure(unit, member, error, transient=transient, detail=detail)
        else:
            policy = unexpected_error_policy(member)  # type: ignore[arg-type]
            outcome = record_member_failure(
                unit,
                member,
                error,
                transient=policy == "retry",
                pause="unexpected error" if policy == "pause" else "",
                detail=detail,
            )
        unit.save()
    return outcome


def record_member_failure(
    unit: Unit,
    member: SagaMember,
    error: SafeError,
    *,
    transient: bool = False,
    pause: str = "",
    detail: dict[str, Any] | None = None,
) -> Outcome:
    """Count a member's failed attempt; retry it, or fail it for good, and then its group
    (beyond a map's tolerance), with what the saga does next: pause, or compensate."""
    stage = unit.steps[member.index]
    extra = detail or {}
    attempt = member.attempts + 1
    values: dict[str, Any] = {
        "attempts": attempt,
        "error_code": error.code,
        "error_message": error.message,
        "started_at": member.started_at or timezone.now(),
    }
    forward = going(unit, stage)
    # (Only a step member's failures are transient: a child member has no policy of its own.)
    policy = policy_of(member, "retry") if transient else None  # type: ignore[arg-type]
    if forward and policy is not None and not pause and attempt < policy.max_attempts:
        countdown = policy.countdown(attempt)
        retrying = {**error.as_dict(), "attempt": attempt, "retry_in_s": round(countdown, 3)}
        unit.move_step(
            member, StepStatus.RUNNING, EventKind.STEP_RETRYING, {**retrying, **extra}, **values
        )
        return Outcome("retry", countdown=countdown, error=error)
    unit.move_step(
        member,
        StepStatus.FAILED,
        EventKind.STEP_FAILED,
        {**error.as_dict(), "attempt": attempt, "exhausted": transient, **extra},
        finished_at=timezone.now(),
        **values,
    )
    if not forward:
        return STOP  # its saga paused or turned back meanwhile: recorded, nothing more
    members = unit.members(stage.index)
    tolerated = int((stage.definition.get("map") or {}).get("tolerated_failures") or 0)
    failed = [m for m in members if m.status == StepStatus.FAILED]
    if not pause and len(failed) <= tolerated:
        after_member(unit, stage)
        return STOP  # the group goes on without it
    unit.move_step(
        stage,
        StepStatus.FAILED,
        EventKind.STEP_FAILED,
        {**error.as_dict(), "failed_member": member.name},
        finished_at=timezone.now(),
        error_code=error.code,
        error_message=error.message,
    )
    unit.set_saga(error_code=error.code, error_message=error.message)
    if not pause and transient and member.definition.get("on_exhausted") == "pause":
        pause = "paused by policy"
    if pause or unit.passed_pivot():
        reason = pause or "failed after the pivot"
        unit.move_saga(
            SagaStatus.FAILED, EventKind.SAGA_PAUSED, {"step": member.label, "reason": reason}
        )
    else:
        # Sent after this commits (the sweeper sends them if that is lost), not left to the
        # member's error callback: the members' callbacks carry epochs of their own, and a
        # member sent again since would find this one's older.
        begin_compensation(unit, EventKind.COMPENSATION_STARTED)
    return Outcome("fail", error=error)


def member_lost(
    saga_id: str, index: int, position: int, error: SafeError, why: str
) -> Outcome | None:
    """Count a member's attempt that may have run and recorded nothing (`attempt_lost`)."""
    with transaction.atomic():
        row = lock_member(saga_id, index, position)
        if row is None or row.status not in IN_PROGRESS:
            return None  # before the saga's lock (see `member_attempt_failed`)
        unit = lock(saga_id)
        member = unit.member(index, position)
        if member is None or member.status not in IN_PROGRESS:
            return None
        if not going(unit, unit.steps[index]):
            return None
        outcome = record_member_failure(
            unit, member, error, transient=True, detail={"delivery": why}
        )
        unit.save()
    return outcome


def resend(unit: Unit, stage: Any, member: SagaMember, *, countdown: float = 0.0) -> None:
    """Send one member again, under a new epoch of its own (the saga's, raised)."""
    saga_id, epoch = str(unit.saga.pk), unit._next_epoch()
    unit.move_step(member, member.status, None, epoch=epoch)
    sent = [(member.position, int(member.definition["time_limit"]))]
    unit.after_commit.append(
        lambda: dispatch.send_members(saga_id, epoch, stage.index, sent, countdown)
    )


BEGIN_STAGE["group"] = enter_group
