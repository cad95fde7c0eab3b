"""The public Python API of the framework: start a saga, and the operator actions.

The REST API, the admin and management commands call these functions and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from . import bulk, conf, engine
from .bulk import BulkFilter, BulkPreview
from .engine import Plan
from .models import BulkAction, Saga


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


def saga_plan(*, saga_id: UUID | str, action: str, index: int | None = None) -> Plan:
    """Preview an operator action (`retry`, `compensate`, `resolve`) without doing it."""
    return engine.plan(saga_id, action, index)


def saga_retry(
    *,
    saga_id: UUID | str,
    actor: str = "",
    bulk_action_id: int | None = None,
    matches: Callable[[], bool] | None = None,
) -> Plan:
    """Resume a failed saga where it stopped, forward or in its compensation.

    The timeline records the actor and, for a saga retried by a bulk action, its id. With
    `matches`, it is asked under the saga's lock, and a saga for which it says False is not
    changed (`InvalidTransition`: "The saga no longer matches the filter.").
    """
    return engine.retry(saga_id, actor=actor, bulk_action_id=bulk_action_id, matches=matches)


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


def saga_step_resolve(*, saga_id: UUID | str, index: int, actor: str = "") -> Plan:
    """Mark a step whose compensation failed as compensated by hand, and carry on."""
    return engine.resolve(saga_id, index, actor=actor)


def bulk_action_preview(*, action: str, bulk_filter: BulkFilter) -> BulkPreview:
    """What retrying or compensating every saga the filter matches would do: how many match,
    and their plans (`saga_plan`), in groups. `BulkActionRefused` beyond
    `SAGAS_BULK_MAX_SAGAS`."""
    return bulk.preview(action=action, bulk_filter=bulk_filter, limit=conf.bulk_max_sagas())


def bulk_action_start(
    *,
    action: str,
    bulk_filter: BulkFilter,
    actor: str,
    created_by: Any = None,
    expected_count: int | None = None,
) -> BulkAction:
    """Retry or compensate every saga the filter matches, in the background, in batches.

    The matching sagas are recorded now; each is acted on when its batch reaches it, through
    `saga_retry` or `saga_compensate`, its timeline naming the actor and the bulk action, or
    skipped (and reported) if it changed since. `BulkActionRefused` when the filter matches
    no saga, or more than `SAGAS_BULK_MAX_SAGAS`; `BulkPreviewOutdated` when it no longer
    matches `expected_count` sagas (the preview's count).
    """
    return bulk.create(
        action=action,
        bulk_filter=bulk_filter,
        actor=actor,
        created_by=created_by,
        expected_count=expected_count,
    )
