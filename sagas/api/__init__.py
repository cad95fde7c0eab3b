"""The framework's REST API (the `api` extra): serializers, views, and shared DRF pieces.

A project routes it with `path("api/sagas/", include("sagas.urls"))`. The names below are the
package's public ones; a domain app's API may reuse them (pagination, throttling, errors).

The names are imported when first used, as at the package root: a project names
`sagas.api.parsers.BoundedJSONParser` in its DRF settings, which DRF's views read when they
are imported.
"""

from ..lazy import exports

_WHERE = {
    "BULK_ACTION_DETAIL": "serializers",
    "SAGA_DETAIL": "serializers",
    "BulkActionDetailSerializer": "serializers",
    "BulkActionRequestSerializer": "serializers",
    "BulkActionSerializer": "serializers",
    "BulkFilterSerializer": "serializers",
    "BulkPreviewRequestSerializer": "serializers",
    "BulkPreviewSerializer": "serializers",
    "DetailSerializer": "serializers",
    "ErrorSerializer": "serializers",
    "ModelSerializer": "serializers",
    "PlanQuerySerializer": "serializers",
    "PlanSerializer": "serializers",
    "SagaDetailSerializer": "serializers",
    "SagaEventSerializer": "serializers",
    "SagaSerializer": "serializers",
    "SagaStepSerializer": "serializers",
    "SagaSummarySerializer": "serializers",
    "StrictCharField": "serializers",
    "StrictIntegerField": "serializers",
    "StrictSerializer": "serializers",
    "ERROR_RESPONSES": "views",
    "BulkActionViewSet": "views",
    "Conflict": "views",
    "MayOperate": "views",
    "Pagination": "views",
    "SagaFilter": "views",
    "SignalURLView": "views",
    "SagaViewSet": "views",
    "ScopedThrottle": "views",
}

__all__ = [
    "BULK_ACTION_DETAIL",
    "ERROR_RESPONSES",
    "SAGA_DETAIL",
    "BulkActionDetailSerializer",
    "BulkActionRequestSerializer",
    "BulkActionSerializer",
    "BulkActionViewSet",
    "BulkFilterSerializer",
    "BulkPreviewRequestSerializer",
    "BulkPreviewSerializer",
    "Conflict",
    "DetailSerializer",
    "ErrorSerializer",
    "MayOperate",
    "ModelSerializer",
    "Pagination",
    "PlanQuerySerializer",
    "PlanSerializer",
    "SagaDetailSerializer",
    "SagaEventSerializer",
    "SagaFilter",
    "SagaSerializer",
    "SagaStepSerializer",
    "SagaSummarySerializer",
    "SagaViewSet",
    "ScopedThrottle",
    "SignalURLView",
    "StrictCharField",
    "StrictIntegerField",
    "StrictSerializer",
]


__getattr__, __dir__ = exports(__name__, _WHERE, __all__)
