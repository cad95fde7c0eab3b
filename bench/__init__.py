"""Benchmarks: the saga engine against a bare Celery chain, on the same broker and database."""
