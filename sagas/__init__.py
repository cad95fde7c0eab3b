"""Sagas for Django on Celery: ordered steps with compensations, kept in PostgreSQL."""

__version__ = "0.1.0"
