"""The saga endpoints, for a project's URLconf: `path("api/sagas/", include("sagas.urls"))`.

List and detail, the preview (`plan`), the operator actions (`retry`, `compensate`,
`steps/<index>/resolve`) and signals (`<id>/signals/`), bulk actions (`bulk/preview/`,
`bulk/`, `bulk/<id>/`), the signed signal URLs of external systems (`signals/<token>/`) and
the approvers' pages of signed approval links (`approvals/<token>/`), named in the `sagas`
namespace: `reverse("sagas:saga-detail", ...)`, `"sagas:bulk-action-detail"`,
`"sagas:signal-url"`, `"sagas:approval-link"`.
Needs the `api` extra (Django REST framework, django-filter, drf-spectacular).
"""

from django.urls import path
from rest_framework.routers import SimpleRouter

from .api import BulkActionViewSet, SagaViewSet, SignalURLView
from .views import ApprovalLinkView

app_name = "sagas"

router = SimpleRouter()
router.register("bulk", BulkActionViewSet, basename="bulk-action")
router.register("", SagaViewSet, basename="saga")

urlpatterns = [
    # A wait's signed URL, for external systems (`sagas.signing`): the token is the credential.
    path("signals/<str:token>/", SignalURLView.as_view(), name="signal-url"),
    # An approver's signed link: a page (GET) whose form (POST, CSRF) approves or rejects.
    path("approvals/<str:token>/", ApprovalLinkView.as_view(), name="approval-link"),
    *router.urls,
]
