"""URL configuration: the admin, the REST API under /api/ (the framework's saga endpoints under
/api/sagas/), the health check and the Prometheus metrics; with `BENCH_ENDPOINTS`, the API load
benchmark's ceiling under /bench/ (bench.endpoints)."""

from django.conf import settings
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
if settings.BENCH_ENDPOINTS:
    urlpatterns.append(path("bench/", include("bench.endpoints")))
