"""The project that hosts the saga framework and the reference order saga."""

from .celery import app as celery_app

__all__ = ("celery_app",)
