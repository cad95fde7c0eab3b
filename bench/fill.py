"""`make fill`: a benchmark database holding what years of production leave, finished sagas.

Real Celery workers first run one order saga of each outcome the fill copies (completed;
compensated after a declined card; compensated after an unsupported destination; failed, paused
by the payment step's policy while the gateway is down): those rows are what the engine
writes. Then set-based SQL (`INSERT ... SELECT` over `generate_series`) copies them, in
batches of one transaction each, into as many sagas as asked, each with its own id, order id
(its business key, in its input and its steps' outputs too) and times spread over the past
year. Step rows and events come with their saga, in the engine's order. It ends with
`VACUUM ANALYZE`, as autovacuum would have left old tables.

The fill goes to a database of the benchmark's own (`<database>_bench`, or `--database`),
never to the database of DATABASE_URL itself.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from bench.run import FINAL, bench_database_url, debug_off, wait, workers

# Out of every hundred sagas: how many end as each template. Failed sagas (waiting for an
# operator) are few, as in production, which is what makes their list worth an index.
MIX = (("completed", 85), ("compensated_declined", 4), ("compensated_shipping", 8), ("failed", 3))
TOKENS = {
    "completed": ("tok_ok", "NO"),
    "compensated_declined": ("tok_declined", "NO"),
    "compensated_shipping": ("tok_ok", "AQ"),
    "failed": ("tok_timeout", "NO"),
}
EXPECTED = {
    "completed": "completed",
    "compensated_declined": "compensated",
    "compensated_shipping": "compensated",
    "failed": "failed",
}


def run_templates(queue: str, concurrency: int) -> dict[str, tuple[str, str]]:
    """One real order saga per outcome, run by Celery workers: {outcome: (saga id, order id)}."""
    from decimal import Decimal

    from inventory.services import product_create
    from orders.services import order_submit
    from sagas.models import Saga

    sku = product_create(
        sku=f"FILL-{uuid.uuid4().hex[:8]}", name="Fill", price=Decimal("9.90"), stock_on_hand=10**9
    ).sku
    templates: dict[str, tuple[str, str]] = {}
    with workers(queue, concurrency):
        for outcome, (token, country) in TOKENS.items():
            saga, _ = order_submit(
                customer=None,
                items=[{"sku": sku, "quantity": 2}],
                shipping_address={
                    "name": "Fill",
                    "line1": "1 Road",
                    "city": "Oslo",
                    "postal_code": "0150",
                    "country": country,
                },
                payment_token=token,
            )
            templates[outcome] = (str(saga.pk), saga.input["order_id"])
        ids = [saga_id for saga_id, _ in templates.values()]
        wait(
            lambda: Saga.objects.filter(pk__in=ids, status__in=FINAL).count() == len(ids),
            120,
            "the template sagas to finish",
        )
    for outcome, (saga_id, _) in templates.items():
        status = Saga.objects.get(pk=saga_id).status
        if status != EXPECTED[outcome]:
            raise SystemExit(f"fill: the {outcome} template ended {status}")
    return templates


def columns(model: Any) -> list[str]:
    return [f.column for f in model._meta.concrete_fields]


def select_list(model: Any, replace: dict[str, str]) -> tuple[str, str]:
    """The table's columns (not an auto-incremented id) and, for each, the template row's
    value `t.<column>` unless `replace` gives an expression."""
    names = [
        c
        for c in columns(model)
        if not (c == "id" and model._meta.pk.get_internal_type() != "UUIDField")
    ]
    quoted = ", ".join(f'"{c}"' for c in names)
    return quoted, ", ".join(replace.get(c, f't."{c}"') for c in names)


def statements(seed: str) -> list[str]:
    """The batch's three statements, parameterised by its first and last saga number."""
    from sagas.models import Saga, SagaEvent, SagaStep

    # Saga n of this fill: its id and its order id (derived, so its steps and events find it).
    saga_id = f"md5('{seed}s' || g)::uuid"
    order_id = f"md5('{seed}o' || g)::uuid::text"
    created = "(now() - interval '365 days' + (g::bigint * %(spacing)s) * interval '1 microsecond')"
    shift = f"({created} - p.created_at)"
    # The template's times, moved to the copy's.
    times = {"created_at", "updated_at", "finished_at", "started_at", "compensated_at"}

    def moved(model: Any) -> dict[str, str]:
        return {c: f't."{c}" + {shift}' for c in columns(model) if c in times}

    picks = "generate_series(%(first)s, %(last)s) g JOIN fill_pick p ON p.bucket = g %% 100"
    saga_columns, saga_values = select_list(
        Saga,
        {
            **moved(Saga),
            "id": saga_id,
            "business_key": order_id,
            "input": f"replace(t.input::text, p.order_id, {order_id})::jsonb",
            "idempotency_key": "NULL",
        },
    )
    step_columns, step_values = select_list(
        SagaStep,
        {
            **moved(SagaStep),
            "saga_id": saga_id,
            "output": f"replace(t.output::text, p.order_id, {order_id})::jsonb",
        },
    )
    event_columns, event_values = select_list(SagaEvent, {**moved(SagaEvent), "saga_id": saga_id})
    return [
        f"INSERT INTO {Saga._meta.db_table} ({saga_columns}) SELECT {saga_values} FROM {picks} "
        f"JOIN {Saga._meta.db_table} t ON t.id = p.template ORDER BY g",
        f"INSERT INTO {SagaStep._meta.db_table} ({step_columns}) SELECT {step_values} "
        f"FROM {picks} JOIN {SagaStep._meta.db_table} t ON t.saga_id = p.template "
        "ORDER BY g, t.index",
        f"INSERT INTO {SagaEvent._meta.db_table} ({event_columns}) SELECT {event_values} "
        f"FROM {picks} JOIN {SagaEvent._meta.db_table} t ON t.saga_id = p.template "
        "ORDER BY g, t.id",
    ]


def pick_table(cursor: Any, templates: dict[str, tuple[str, str]]) -> None:
    """fill_pick: for each of a hundred buckets, the template a saga in it copies."""
    cursor.execute(
        "CREATE TEMP TABLE fill_pick (bucket int PRIMARY KEY, template uuid, order_id text, "
        "created_at timestamptz)"
    )
    bucket = 0
    for outcome, share in MIX:
        saga_id, order_id = templates[outcome]
        for _ in range(share):
            cursor.execute(
                "INSERT INTO fill_pick SELECT %s, id, %s, created_at FROM sagas_saga WHERE id = %s",
                [bucket, order_id, saga_id],
            )
            bucket += 1
    assert bucket == 100, "MIX must add up to a hundred"


TABLES = ["sagas_saga", "sagas_sagastep", "sagas_sagaevent"]


@contextmanager
def indexes_set_aside(cursor: Any) -> Iterator[None]:
    """Drop the tables' indexes that back no constraint while the rows go in, and build them
    again after, as pg_restore does: one sorted build is much faster than millions of random
    keys inserted one at a time into indexes larger than the server's buffers. The primary
    keys and unique constraints stay (the foreign keys check against them)."""
    cursor.execute(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = ANY(%s) AND indexname "
        "NOT IN (SELECT conindid::regclass::text FROM pg_constraint WHERE conindid <> 0)",
        [TABLES],
    )
    saved = cursor.fetchall()
    for name, _ in saved:
        cursor.execute(f'DROP INDEX "{name}"')
    try:
        yield
    finally:
        started = time.monotonic()
        cursor.execute("SET maintenance_work_mem = '256MB'")
        for _, definition in saved:
            cursor.execute(definition)
        print(f"fill: {len(saved)} indexes built again, {time.monotonic() - started:.0f} s")


def fill(
    templates: dict[str, tuple[str, str]], *, sagas: int, batch: int, keep_indexes: bool
) -> None:
    from django.db import connection

    seed = uuid.uuid4().hex[:12]
    sql = statements(seed)
    # Spread over the year, the newest a few minutes ago: microseconds between two sagas.
    spacing = int((365 * 86400 - 600) * 1_000_000 / sagas)
    with connection.cursor() as cursor:
        pick_table(cursor, templates)
        cursor.execute("SET synchronous_commit = off")  # a bench fill: a lost batch is harmless
        with nullcontext() if keep_indexes else indexes_set_aside(cursor):
            insert_batches(cursor, sql, sagas=sagas, batch=batch, spacing=spacing)
        cursor.execute("DROP TABLE fill_pick")


def insert_batches(cursor: Any, sql: list[str], *, sagas: int, batch: int, spacing: int) -> None:
    from django.db import transaction

    started = time.monotonic()
    for first in range(1, sagas + 1, batch):
        last = min(sagas, first + batch - 1)
        with transaction.atomic():
            for statement in sql:
                cursor.execute(statement, {"first": first, "last": last, "spacing": spacing})
        elapsed = time.monotonic() - started
        rate = last / elapsed
        print(
            f"fill: {last:,} of {sagas:,} sagas, {elapsed:.0f} s, {rate:,.0f} sagas/s, "
            f"about {(sagas - last) / rate:.0f} s left",
            flush=True,
        )


def vacuum() -> None:
    from django.db import connection

    started = time.monotonic()
    with connection.cursor() as cursor:
        for table in ("sagas_saga", "sagas_sagastep", "sagas_sagaevent"):
            cursor.execute(f"VACUUM (ANALYZE) {table}")
        cursor.execute(
            "SELECT relname, n_live_tup, pg_size_pretty(pg_total_relation_size(relid)) "
            "FROM pg_stat_user_tables WHERE relname IN "
            "('sagas_saga', 'sagas_sagastep', 'sagas_sagaevent') ORDER BY relname"
        )
        sizes = cursor.fetchall()
    print(f"fill: VACUUM ANALYZE, {time.monotonic() - started:.0f} s")
    for name, rows, size in sizes:
        print(f"fill: {name}: {rows:,} rows, {size} with its indexes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sagas", type=int, default=1_000_000, help="finished sagas to add")
    parser.add_argument("--batch", type=int, default=50_000, help="sagas per transaction")
    parser.add_argument(
        "--keep-indexes",
        action="store_true",
        help="insert with every index in place (slower) instead of building them again after",
    )
    parser.add_argument(
        "--database", help="the database to fill (default: <DATABASE_URL's database>_bench)"
    )
    args = parser.parse_args()
    os.environ["DATABASE_URL"] = bench_database_url(args.database)
    os.environ["SAGAS_LOG_LEVEL"] = "WARNING"
    queue = f"fill-{uuid.uuid4().hex[:8]}"
    os.environ["CELERY_TASK_DEFAULT_QUEUE"] = queue  # read when Django sets up
    debug_off()
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)
    started = time.monotonic()
    templates = run_templates(queue, int(os.environ.get("WORKER_CONCURRENCY", "2")))
    print(f"fill: template sagas run by the workers in {time.monotonic() - started:.0f} s")
    fill(templates, sagas=args.sagas, batch=args.batch, keep_indexes=args.keep_indexes)
    vacuum()
    print(f"fill: done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
