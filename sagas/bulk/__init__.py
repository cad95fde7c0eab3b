"""Bulk actions: retry or compensate every saga that matches a filter, or mark a stage of each
as done, after a preview.

`filters` says which sagas a filter matches, `skip` which stage a skip marks as done and with
what, `preview` what the action would do to them (their plans, in groups), `create` starts a
bulk action (the matching sagas' ids, recorded), and `batches` works through them in the
background, a batch per task message. The services (`sagas.services.bulk_action_preview`,
`bulk_action_start`) are the way in; the public names are here, but for `batches`, which the
tasks import (it acts through `sagas.services`).
"""

from .create import create
from .filters import BulkFilter, sagas_have_business_key
from .preview import BulkPreview, PlanGroup, matching_ids, preview
from .skip import BulkSkip

__all__ = [
    "BulkFilter",
    "BulkPreview",
    "BulkSkip",
    "PlanGroup",
    "create",
    "matching_ids",
    "preview",
    "sagas_have_business_key",
]
