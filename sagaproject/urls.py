"""URL configuration: the admin, the REST API under /api/ (the framework's saga endpoints under
/api/sagas/), and the health check."""

from django.contrib import admin
from django.urls import include, path

from sagaproject.api import HealthView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/sagas/", include("sagas.urls")),
    path("api/", include("sagaproject.api")),
    path("healthz", HealthView.as_view(), name="healthz"),
]
