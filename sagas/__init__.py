"""Sagas for Django on Celery: ordered steps with compensations, kept in PostgreSQL."""
