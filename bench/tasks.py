"""The ceiling: a bare Celery chain whose tasks each do one committed UPDATE."""

from __future__ import annotations

from celery import shared_task
from django.db import connection

TABLE = "bench_counter"


def ensure_table() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, n integer NOT NULL)"
        )


def new_rows(count: int) -> list[int]:
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {TABLE} (n) SELECT 0 FROM generate_series(1, %s) RETURNING id", [count]
        )
        return [row[0] for row in cursor.fetchall()]


def touch(row_id: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {TABLE} SET n = n + 1 WHERE id = %s", [row_id])


def row_exists(row_id: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT 1 FROM {TABLE} WHERE id = %s", [row_id])
        return cursor.fetchone() is not None


@shared_task(name="bench.bare_step")
def bare_step(row_id: int) -> None:
    """One committed UPDATE (autocommit), nothing else."""
    touch(row_id)
