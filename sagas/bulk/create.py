"""Starting a bulk action: the ids of the sagas its filter matches, recorded, and its first
batch sent to a worker."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction

from .. import conf
from ..engine import dispatch
from ..exceptions import BulkActionRefused, BulkPreviewOutdated
from ..models import BulkAction, BulkActionItem
from .filters import BulkFilter
from .preview import checked_skip, matching_ids
from .skip import BulkSkip

logger = logging.getLogger("sagas")


def create(
    *,
    action: str,
    bulk_filter: BulkFilter,
    actor: str,
    created_by: Any = None,
    expected_count: int | None = None,
    skip: BulkSkip | None = None,
) -> BulkAction:
    """Record a bulk action with the sagas its filter matches now; send its first batch after
    the commit. With `expected_count` (the preview's count), refuse if as many no longer match.
    A skip (`action` "skip") records its stage, output and note.
    """
    if problems := bulk_filter.problems():
        raise BulkActionRefused(" ".join(f"{field}: {text}" for field, text in problems.items()))
    skip = checked_skip(action, skip)
    with transaction.atomic():
        ids = matching_ids(bulk_filter, conf.bulk_max_sagas())
        if not ids:
            raise BulkActionRefused("No saga matches this filter.")
        if expected_count is not None and len(ids) != expected_count:
            raise BulkPreviewOutdated(
                f"The filter now matches {len(ids):,} sagas, not the {expected_count:,} of "
                "its preview: preview it again."
            )
        bulk_action = BulkAction.objects.create(
            action=action,
            filter=bulk_filter.as_json(),
            actor=actor,
            created_by=created_by,
            batch_size=conf.bulk_batch_size(),
            total=len(ids),
            **(
                {"stage": skip.stage, "output": skip.output, "note": skip.note}
                if skip is not None
                else {}
            ),
        )
        items = (BulkActionItem(bulk_action=bulk_action, saga_id=saga_id) for saga_id in ids)
        BulkActionItem.objects.bulk_create(items, batch_size=1000)
        transaction.on_commit(send_batch_or_leave_to_sweeper(bulk_action.pk))
    return bulk_action


def send_batch_or_leave_to_sweeper(bulk_action_id: int) -> Callable[[], None]:
    """Send the bulk action's next batch; if the broker is down, the sweeper sends it later."""

    def send() -> None:
        try:
            dispatch.send_bulk_batch(bulk_action_id)
        except Exception as exc:
            logger.warning(
                "bulk action %s: could not send its next batch (%s); "
                "the recovery sweeper will send it",
                bulk_action_id,
                type(exc).__name__,
            )

    return send
