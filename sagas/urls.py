"""The saga endpoints, for a project's URLconf: `path("api/sagas/", include("sagas.urls"))`.

List and detail, the preview (`plan`) and the operator actions (`retry`, `compensate`,
`steps/<index>/resolve`), and bulk actions (`bulk/preview/`, `bulk/`, `bulk/<id>/`), named in
the `sagas` namespace: `reverse("sagas:saga-detail", ...)`, `"sagas:bulk-action-detail"`.
Needs the `api` extra (Django REST framework, django-filter, drf-spectacular).
"""

from rest_framework.routers import SimpleRouter

from .api import BulkActionViewSet, SagaViewSet

app_name = "sagas"

router = SimpleRouter()
router.register("bulk", BulkActionViewSet, basename="bulk-action")
router.register("", SagaViewSet, basename="saga")

urlpatterns = router.urls
