"""The framework's REST API (the `api` extra): serializers, views, and shared DRF pieces.

A project routes it with `path("api/sagas/", include("sagas.urls"))`. The names below are the
package's public ones; a domain app's API may reuse them (pagination, throttling, errors).
"""

from .serializers import (
    BULK_ACTION_DETAIL,
    SAGA_DETAIL,
    BulkActionDetailSerializer,
    BulkActionRequestSerializer,
    BulkActionSerializer,
    BulkFilterSerializer,
    BulkPreviewRequestSerializer,
    BulkPreviewSerializer,
    DetailSerializer,
    ErrorSerializer,
    PlanQuerySerializer,
    PlanSerializer,
    SagaDetailSerializer,
    SagaEventSerializer,
    SagaSerializer,
    SagaStepSerializer,
    SagaSummarySerializer,
    StrictCharField,
    StrictIntegerField,
    StrictSerializer,
)
from .views import (
    ERROR_RESPONSES,
    BulkActionViewSet,
    Conflict,
    MayOperate,
    Pagination,
    SagaFilter,
    SagaViewSet,
    ScopedThrottle,
)

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
    "StrictCharField",
    "StrictIntegerField",
    "StrictSerializer",
]
