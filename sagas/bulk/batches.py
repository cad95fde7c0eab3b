"""A bulk action's work: its sagas a batch at a time, each acted on once, each outcome counted.

Each saga is acted on in a transaction of its own, which also records its outcome and counts
it: a batch delivered twice (a worker died before its acknowledgement, or the sweeper sent it
again) finds the sagas it already did with their outcome and passes over them. A saga that
changed since the bulk action started is skipped, with the reason: it no longer matches the
filter, its plan no longer allows the action, it is busy (a step is running), or it is gone; a
skip's saga also when it has no stage of that name, or that stage refuses the output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from functools import partial
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.db import InterfaceError, OperationalError, transaction
from django.db.models import Exists, F, OuterRef
from django.utils import timezone

from .. import services
from ..engine import Plan, safe_error
from ..exceptions import InvalidTransition
from ..models import (
    BulkAction,
    BulkActionItem,
    BulkActionStatus,
    BulkOperation,
    BulkOutcome,
    Saga,
    SagaStep,
)
from .create import send_batch_or_leave_to_sweeper
from .filters import BulkFilter
from .skip import BulkSkip, refused_output

logger = logging.getLogger("sagas")

# The service each bulk action calls on every saga: the same as the single actions'.
SERVICES: dict[str, Callable[..., Plan]] = {
    BulkOperation.RETRY: services.saga_retry,
    BulkOperation.COMPENSATE: services.saga_compensate,
    BulkOperation.RECONCILE: services.saga_reconcile,
}

DATABASE_UNAVAILABLE = (OperationalError, InterfaceError)


def _service(bulk_action: BulkAction) -> Callable[..., Plan]:
    if bulk_action.action == BulkOperation.SKIP:
        return partial(_skip, BulkSkip.of(bulk_action))
    return SERVICES[bulk_action.action]


def _skip(skip: BulkSkip, *, saga_id: UUID, **by: Any) -> Plan:
    """`saga_skip` of the stage of the skip's name (or the group's member), with its output
    and note; `by` are the actor, the bulk action and `matches`, as for a retry."""
    stages = SagaStep.objects.filter(saga_id=saga_id).order_by("index")
    target = skip.target(saga_id, tuple(stages.values_list("name", flat=True)))
    if isinstance(target, str):
        raise InvalidTransition(target)
    index, member = target
    try:
        return services.saga_skip(
            saga_id=saga_id,
            index=index,
            output=skip.output,
            note=skip.note,
            member=member,
            **by,
        )
    except ValidationError as error:  # its stage's limit, or a wait's validator
        raise InvalidTransition(refused_output(error)) from None


def run_batch(bulk_action_id: int) -> bool:
    """Act on the next batch of the bulk action's sagas; returns whether any remain (send the
    next batch). Raises `BulkAction.DoesNotExist` for a bulk action deleted since."""
    bulk_action = BulkAction.objects.get(pk=bulk_action_id)
    if bulk_action.is_finished:
        return False
    now = timezone.now()
    BulkAction.objects.filter(pk=bulk_action.pk, status=BulkActionStatus.PENDING).update(
        status=BulkActionStatus.RUNNING, started_at=now, updated_at=now
    )
    pending = bulk_action.items.filter(outcome=BulkOutcome.PENDING)
    batch = list(pending.order_by("id").values_list("pk", "saga_id")[: bulk_action.batch_size])
    bulk_filter = BulkFilter.from_json(bulk_action.filter)
    matching = set(
        bulk_filter.sagas()
        .filter(pk__in=[saga_id for _, saga_id in batch])
        .values_list("pk", flat=True)
    )
    for item_id, saga_id in batch:
        _act_once(bulk_action, item_id, saga_id, matches=saga_id in matching)
    if pending.exists():
        return True
    _finish(bulk_action.pk)
    return False


def _act_once(bulk_action: BulkAction, item_id: int, saga_id: UUID, *, matches: bool) -> None:
    with transaction.atomic():
        item = (
            BulkActionItem.objects.select_for_update(skip_locked=True)
            .filter(pk=item_id, outcome=BulkOutcome.PENDING)
            .first()
        )
        if item is None:  # another delivery of this batch has it, or had it
            return
        item.outcome, item.reason = _act(bulk_action, saga_id, matches=matches)
        item.save(update_fields=["outcome", "reason"])
        # The outcomes are named as the bulk action's counts: done, skipped, failed.
        counter = str(item.outcome)
        BulkAction.objects.filter(pk=bulk_action.pk).update(
            **{counter: F(counter) + 1}, updated_at=timezone.now()
        )


def _act(bulk_action: BulkAction, saga_id: UUID, *, matches: bool) -> tuple[str, str]:
    """The outcome of the action on one saga, and what was done or why it was skipped. The
    action runs in a savepoint: if it is refused or fails, nothing of it stays."""
    if not matches:
        if not Saga.objects.filter(pk=saga_id).exists():
            return BulkOutcome.SKIPPED, "The saga no longer exists."
        return BulkOutcome.SKIPPED, "The saga no longer matches the filter."
    act = _service(bulk_action)
    bulk_filter = BulkFilter.from_json(bulk_action.filter)
    try:
        plan = act(
            saga_id=saga_id,
            actor=bulk_action.actor,
            bulk_action_id=bulk_action.pk,
            # Again under the saga's lock: it may have changed while the action waited for it.
            matches=lambda: bulk_filter.sagas().filter(pk=saga_id).exists(),
        )
    except InvalidTransition as exc:  # its plan no longer allows it, or busy (SagaBusy)
        return BulkOutcome.SKIPPED, str(exc)[:500]
    except Saga.DoesNotExist:
        return BulkOutcome.SKIPPED, "The saga no longer exists."
    except DATABASE_UNAVAILABLE:
        raise  # the task sends the batch again later
    except Exception as exc:
        logger.exception(
            "bulk action %s: %s of saga %s failed", bulk_action.pk, bulk_action.action, saga_id
        )
        return BulkOutcome.FAILED, safe_error(exc).message
    return BulkOutcome.DONE, plan.reason


def _finish(bulk_action_id: int) -> None:
    now = timezone.now()
    pending = BulkActionItem.objects.filter(bulk_action=OuterRef("pk"), outcome=BulkOutcome.PENDING)
    BulkAction.objects.filter(pk=bulk_action_id).exclude(status=BulkActionStatus.COMPLETED).filter(
        ~Exists(pending)
    ).update(status=BulkActionStatus.COMPLETED, finished_at=now, updated_at=now)


def resume_stalled(*, stale_after: timedelta, limit: int = 100) -> list[int]:
    """Send again the next batch of bulk actions with no progress for `stale_after` (their
    message was lost). A batch sent twice is harmless: each saga is acted on once."""
    with transaction.atomic():
        stalled = list(
            BulkAction.objects.select_for_update(skip_locked=True)
            .filter(
                status__in=(BulkActionStatus.PENDING, BulkActionStatus.RUNNING),
                updated_at__lt=timezone.now() - stale_after,
            )
            .order_by("updated_at")
            .values_list("pk", flat=True)[:limit]
        )
        # Touched, so that the next sweep gives the batch sent now its time.
        BulkAction.objects.filter(pk__in=stalled).update(updated_at=timezone.now())
        for bulk_action_id in stalled:
            transaction.on_commit(send_batch_or_leave_to_sweeper(bulk_action_id))
    return stalled
