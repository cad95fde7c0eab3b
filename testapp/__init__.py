"""The framework's own test project: Django's contrib apps, DRF and `sagas` with its test kit,
nothing of the reference project (as django-celery-beat's `t/proj`). `make test` runs its tests
(`testapp/tests`) beside the reference project's (`tests`); `make check` their fast part.
"""

from .celery import app as celery_app

__all__ = ["celery_app"]
