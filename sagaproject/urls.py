"""URL configuration: the admin, the REST API under /api/ (the framework's saga endpoints under
/api/sagas/), the health check and the Prometheus metrics."""

from django.contrib import admin
from django.urls import include, path

from sagaproject.api import HealthView
from sagas.metrics.views import metrics

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/sagas/", include("sagas.urls")),
    path("api/", include("sagaproject.api")),
    path("healthz", HealthView.as_view(), name="healthz"),
    path("metrics", metrics, name="metrics"),
]
