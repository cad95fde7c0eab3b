"""The public Python API of the framework: start a saga, and the operator actions.

The REST API, the admin and management commands call these functions and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from . import bulk, conf, engine
from .bulk import BulkFilter, BulkPreview, BulkSkip
from .engine import Plan, waits
from .engine.operator import check_output
from .engine.waits import SignalOutcome
from .exceptions import SignalError
from .models import (
    FINAL_STATUSES,
    OPERATOR_REQUEST_ONCE,
    BulkAction,
    OperatorRequest,
    Saga,
)


def saga_start(
    *,
    name: str,
    input: dict[str, Any],
    idempotency_key: str | None = None,
    created_by: Any = None,
) -> tuple[Saga, bool]:
    """Start a saga of the named definition. Returns the saga and whether it is new.

    With an idempotency key, starting again returns the first saga. The chain is sent when
    the surrounding transaction commits, so a caller may create its own rows alongside.
    """
    return engine.start(name, input, idempotency_key=idempotency_key, created_by=created_by)


def saga_plan(
    *,
    saga_id: UUID | str,
    action: str,
    index: int | None = None,
    deadline: engine.Deadline = engine.KEEP,
    locked: bool = True,
    member: int | None = None,
) -> Plan:
    """Preview an operator action (`retry`, `compensate`, `resolve`, `skip`, `reconcile`,
    `repair`) without doing it; `deadline` as for `saga_retry`, `member` as for `saga_skip`.
    Not `locked`: from the rows as they are, never waiting for a running step (a page that
    offers the action); the action's own plan decides."""
    return engine.plan(saga_id, action, index, locked=locked, deadline=deadline, member=member)


def saga_retry(
    *,
    saga_id: UUID | str,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Callable[[], bool] | None = None,
    deadline: engine.Deadline = engine.KEEP,
) -> Plan:
    """Resume a failed saga where it stopped, forward or in its compensation.

    The timeline records the actor and, for a saga retried by a bulk action, its id. With
    `matches`, it is asked under the saga's lock, and a saga for which it says False is not
    changed (`InvalidTransition`: "The saga no longer matches the filter.").

    `deadline`, for a saga going forward: `KEEP` (`sagas.engine.KEEP`, the default) leaves a
    deadline still to come and clears one that passed while the saga waited (else the sweeper
    would compensate it as soon as it runs); None clears it; a datetime (aware, in the
    future) sets a new one. A saga resuming its compensation has none to change
    (`InvalidTransition`).
    """
    return engine.retry(
        saga_id,
        actor=actor,
        bulk_action_id=bulk_action_id,
        matches=matches,
        deadline=deadline,
    )


def saga_compensate(
    *,
    saga_id: UUID | str,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Callable[[], bool] | None = None,
) -> Plan:
    """Abort a running or failed saga: compensate its completed steps in reverse order.
    `matches` as for `saga_retry`."""
    return engine.compensate(saga_id, actor=actor, bulk_action_id=bulk_action_id, matches=matches)


def saga_signal(
    *,
    event: str,
    saga_id: UUID | str | None = None,
    name: str | None = None,
    key: str | None = None,
    payload: Any = None,
    idempotency_key: str | None = None,
    fail: dict[str, str] | None = None,
) -> SignalOutcome:
    """Send `event` to a saga: by `saga_id`, or by its definition's `name` and business `key`
    (the one saga of them not finished).

    Its wait consumes it if the saga waits for it (`status` "consumed": the payload is the
    wait's output, and the saga goes on); it is kept if the wait is still to come ("kept"),
    and refused if the wait is over ("refused", with the `reason`; on the saga's timeline
    too). With an `idempotency_key` used before for this saga, the first signal's outcome
    (`repeated`), and nothing more is done. `fail` (`{"code", "message"}`) fails the wait
    instead, as a business failure: the saga compensates (or pauses past its pivot).

    Raises Django's `ValidationError` (by field) for a payload its wait refuses, `SignalError`
    when no wait of the saga is for `event`, or when no saga, or several, match `name` and
    `key`, and `Saga.DoesNotExist` for an unknown `saga_id`.
    """
    if saga_id is None:
        saga_id = _unfinished(name, key)
    waits.check_payload(saga_id, event, payload, fail=fail is not None)
    return waits.signal(saga_id, event, payload=payload, idempotency_key=idempotency_key, fail=fail)


def saga_approve(
    *, saga_id: UUID | str, actor: str, note: str = "", stage: str | None = None
) -> SignalOutcome:
    """Approve the saga's approval (`Approval`): the one it waits at, or `stage`. The saga goes
    on; `actor` (who approved) and `note` are on its timeline and in the wait's output.

    The same decision again gets the first one's outcome (`repeated`). Raises `SignalError`:
    `NotWaiting` while the saga has not reached the approval, and when it has none (or several
    waiting, and no `stage`); a decision after the approval is over is refused (`status`
    "refused", on the timeline); Django's `ValidationError` for a note PostgreSQL cannot store
    (a NUL character). Check the user's `sagas.approve_saga` before calling this.
    """
    return waits.decide(saga_id, approve=True, actor=actor, note=note, stage=stage)


def saga_reject(
    *, saga_id: UUID | str, actor: str, note: str = "", stage: str | None = None
) -> SignalOutcome:
    """Reject the saga's approval: its wait fails (`approval_rejected`), a business failure,
    and the saga compensates (or pauses, past its pivot). As `saga_approve` otherwise."""
    return waits.decide(saga_id, approve=False, actor=actor, note=note, stage=stage)


def _unfinished(name: str | None, key: str | None) -> UUID:
    if not name or key is None:
        raise SignalError("Give the saga's id, or its definition's name and business key.")
    found = list(
        Saga.objects.filter(name=name, business_key=str(key))
        .exclude(status__in=FINAL_STATUSES)
        .values_list("pk", flat=True)[:10]
    )
    if not found:
        raise SignalError(f"No {name} saga with the key {key!r} is in flight.")
    if len(found) > 1:
        listed = ", ".join(str(pk) for pk in found)
        raise SignalError(f"Several {name} sagas with the key {key!r} are in flight: {listed}.")
    return found[0]


def saga_skip(
    *,
    saga_id: UUID | str,
    index: int,
    output: Any = None,
    actor: str = "",
    note: str = "",
    bulk_action_id: int | None = None,
    matches: Callable[[], bool] | None = None,
    member: int | None = None,
) -> Plan:
    """Mark stage `index` as done by hand, with `output` (what later stages read as its
    output), and go on from there: a wait that waits (its event is then refused as late), or
    the stage a paused saga stopped at going forward (a step that failed for good, a wait
    that timed out). Not an approval (approve it). `note` and `actor` go on the timeline.

    With `member` (its position in the group at stage `index`): a failed member of the group
    a paused saga stopped at is marked as done with `output` (its output in the group's); once
    none of its members has failed, the group goes on (its members not yet run run, then the
    stages after it); until then the saga stays paused.

    Raises Django's `ValidationError` (on `output`) for an output the stage would not take,
    `InvalidTransition` when the saga's state does not allow it (`saga_plan(action="skip",
    index=...)` says why beforehand), `SagaBusy` while a step holds the saga. Check the user's
    `sagas.skip_saga` before calling this. `bulk_action_id` and `matches` as for `saga_retry`.
    """
    check_output(saga_id, index, output, member=member)
    try:
        waits.storable_text(note)
    except ValidationError as error:
        raise ValidationError({"note": error.messages}) from None
    return engine.skip(
        saga_id,
        index,
        output=output,
        actor=actor,
        note=note,
        bulk_action_id=bulk_action_id,
        matches=matches,
        member=member,
    )


def saga_reconcile(
    *,
    saga_id: UUID | str,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Callable[[], bool] | None = None,
) -> Plan:
    """Run a final saga's reconciliation check now (its definition's `reconcile`): what it
    finds flags the saga (or clears its flag) and goes on its timeline; its status never
    changes. `matches` as for `saga_retry`. Raises `InvalidTransition` for a saga in flight
    or of a definition without a check."""
    return engine.reconcile_now(
        saga_id, actor=actor, bulk_action_id=bulk_action_id, matches=matches
    )


def saga_repair(*, saga_id: UUID | str, index: int, actor: str = "") -> Plan:
    """Run the compensation of step `index` again, the repair a discrepancy of the last check
    offers: a worker runs it once this returns, records it on the timeline (who, which step,
    the result) and runs the check again. The saga's status never changes. Raises
    `InvalidTransition` when no recorded discrepancy offers it."""
    return engine.repair(saga_id, index, actor=actor)


def saga_step_resolve(
    *, saga_id: UUID | str, index: int, actor: str = "", member: int | None = None
) -> Plan:
    """Mark a step whose compensation failed as compensated by hand, and carry on; with
    `member`, that member of the group at stage `index`."""
    return engine.resolve(saga_id, index, actor=actor, member=member)


def bulk_action_preview(
    *, action: str, bulk_filter: BulkFilter, skip: BulkSkip | None = None
) -> BulkPreview:
    """What retrying or compensating every saga the filter matches would do, or marking the
    stage `skip` names as done (`action` "skip"): how many match, and their plans
    (`saga_plan`, a skip's output checked by each stage), in groups. `BulkActionRefused`
    beyond `SAGAS_BULK_MAX_SAGAS`, and for a skip without its stage (or a `skip` of another
    action)."""
    return bulk.preview(
        action=action, bulk_filter=bulk_filter, limit=conf.bulk_max_sagas(), skip=skip
    )


def bulk_action_start(
    *,
    action: str,
    bulk_filter: BulkFilter,
    actor: str,
    created_by: Any = None,
    expected_count: int | None = None,
    skip: BulkSkip | None = None,
) -> BulkAction:
    """Retry or compensate every saga the filter matches, or mark the stage `skip` names as
    done in each (`action` "skip", with `skip`'s output and note), in the background, in
    batches.

    The matching sagas are recorded now; each is acted on when its batch reaches it, through
    `saga_retry`, `saga_compensate` or `saga_skip`, its timeline naming the actor and the bulk
    action, or skipped (and reported) if it changed since, or (a skip) has no such stage or
    its stage refuses the output. `BulkActionRefused` when the filter matches no saga, or more
    than `SAGAS_BULK_MAX_SAGAS`, and as `bulk_action_preview`; `BulkPreviewOutdated` when it
    no longer matches `expected_count` sagas (the preview's count).
    """
    return bulk.create(
        action=action,
        bulk_filter=bulk_filter,
        actor=actor,
        created_by=created_by,
        expected_count=expected_count,
        skip=skip,
    )


class KeyReused(Exception):
    """An operator request's key was first used for another action."""


def operator_request_once(
    *, user: Any, key: str, path: str, act: Callable[[], tuple[int, Any]]
) -> tuple[int, Any, bool]:
    """Run an operator's request once per (user, key): `act` (its answer's status and body)
    in one transaction with the key's row (`OperatorRequest`). A key already used gets its
    first answer back, `act` not run, with True (replayed): a request whose answer was lost
    can be sent again. `KeyReused` if the key was used for another path. A request refused
    (an exception from `act`) leaves no row: it may be sent again."""
    try:
        with transaction.atomic():
            claim = OperatorRequest.objects.create(user=user, key=key, path=path)
            status_code, body = act()
            claim.status_code, claim.body = status_code, body
            claim.save(update_fields=["status_code", "body"])
        return status_code, body, False
    except IntegrityError as exc:
        constraint = getattr(getattr(exc.__cause__, "diag", None), "constraint_name", None)
        if constraint != OPERATOR_REQUEST_ONCE:
            raise
    first = OperatorRequest.objects.get(user=user, key=key)
    if first.path != path:
        raise KeyReused(f"This key was used for another request ({first.path}).")
    return first.status_code or 0, first.body, True
