"""Writing: the changed rows and the events in one statement (sent with the COMMIT), and a new
saga with its steps and first event in one statement."""

from __future__ import annotations

from functools import cache
from typing import Any

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.models import Field, Model

from ...models import DefinitionVersion, Saga, SagaEvent, SagaNotice, SagaStep
from .cursors import column, default_db, engine_cursor, execute
from .objects import EventRow, SagaRow, Sql, StepRow


def update_sql(row: Any, attributes: set[str]) -> Sql:
    """UPDATE the given attributes of a row (or of a model instance of the same table)."""
    model: Any = row.model if isinstance(row, SagaRow | StepRow) else type(row)
    db = default_db()
    fields = _fields(model)
    names = sorted(attributes)
    assignments = ", ".join(f"{fields[name][0]} = %s" for name in names)
    params = [fields[name][1].get_db_prep_save(getattr(row, name), db) for name in names]
    table = db.ops.quote_name(model._meta.db_table)
    return f"UPDATE {table} SET {assignments} WHERE id = %s", [*params, row.pk]


@cache
def _fields(model: Any) -> dict[str, tuple[str, Field[Any, Any]]]:
    return {f.attname: (column(f), f) for f in model._meta.concrete_fields}


def insert_events_sql(events: list[EventRow]) -> Sql | None:
    if not events:
        return None
    columns, fields = event_columns()
    db = default_db()
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    params = [
        field.get_db_prep_save(value, db)
        for event in events
        for field, value in zip(fields, event, strict=True)
    ]
    table = db.ops.quote_name(SagaEvent._meta.db_table)
    return f"INSERT INTO {table} ({columns}) VALUES {', '.join([row] * len(events))}", params


@cache
def event_columns() -> tuple[str, list[Field[Any, Any]]]:
    fields = [SagaEvent._meta.get_field(name) for name in EventRow._fields]
    concrete = [f for f in fields if isinstance(f, Field)]
    return ", ".join(column(f) for f in concrete), concrete


def execute_as_one(
    writes: list[Sql | None], *, commit: bool, notice_for: Any = None
) -> list[tuple[int, int]]:
    """Run several INSERT/UPDATE statements as one, with PostgreSQL's writable CTEs; with
    `commit`, in the outermost transaction, send the COMMIT with it (one round trip).

    With `notice_for` (a saga's id), the last statement inserts events, and a `SagaNotice` of
    them is written too: returns (event id, notice id) for each event, in the order given."""
    statements = [w for w in writes if w is not None]
    *first, last = statements
    if notice_for is not None:
        events, notice = f"w{len(first)}", f"w{len(first) + 1}"
        first += [(f"{last[0]} RETURNING id", last[1]), (_notice_sql(events), [notice_for])]
        last = (f"SELECT {events}.id, {notice}.id FROM {events}, {notice} ORDER BY 1", [])
    ctes = ", ".join(f"w{i} AS ({sql})" for i, (sql, _) in enumerate(first))
    sql = (f"WITH {ctes} " if ctes else "") + last[0]
    params = [p for _, ps in first for p in ps] + last[1]
    db = default_db()
    with engine_cursor(db) as cursor:
        execute(db, cursor, sql, params, commit=commit)
        return cursor.fetchall() if notice_for is not None else []


@cache
def _notice_sql(events: str) -> str:
    """The notice of the events inserted by CTE `events`, and (event id, notice id) pairs."""
    table = connection.ops.quote_name(SagaNotice._meta.db_table)
    return (
        f"INSERT INTO {table} (saga_id, first_event_id, last_event_id, created_at) "
        f"SELECT %s, min(id), max(id), clock_timestamp() FROM {events} RETURNING id"
    )


# -- starting --------------------------------------------------------------------------------

# The definition versions this process has stored, committed (each is immutable).
_stored_versions: set[str] = set()


def store_version(digest: str, name: str, steps: list[dict[str, Any]], now: Any) -> None:
    """Store a definition version, committed at once on a connection of its own, before this
    process starts the first saga of it: that start, maybe in a long transaction of the
    caller's, then finds it committed, and neither waits for another start of the same new
    version to commit nor deadlocks with one. (The start's statement inserts it again if it is
    missing, `insert_saga`: a table emptied since, as tests do.)"""
    if digest in _stored_versions:
        return
    other = connections.create_connection(DEFAULT_DB_ALIAS)
    try:
        steps_field = DefinitionVersion._meta.get_field("steps")
        with other.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {other.ops.quote_name(DefinitionVersion._meta.db_table)} "
                "(digest, name, steps, created_at) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT (digest) DO NOTHING",
                [digest, name, steps_field.get_db_prep_save(steps, other), now],
            )
    finally:
        other.close()
    _stored_versions.add(digest)


def insert_saga(
    saga: Saga,
    steps: list[SagaStep],
    event: EventRow,
    *,
    commit: bool,
    notice: bool = False,
    definitions: list[dict[str, Any]] | None = None,
) -> tuple[int, int] | None:
    """Insert a new saga, its steps and its first event in one statement; with `notice`, a
    `SagaNotice` of that event too; with `definitions`, its stages' definitions as the
    `DefinitionVersion` the saga names, unless that version is stored already.

    Returns None, inserting nothing, if a saga with the same name and idempotency key exists;
    else the event's id and the notice's (0 without one). Any other unique constraint (one
    saga in flight per key) raises its IntegrityError. With `commit`, in the outermost
    transaction, the COMMIT goes with it.
    """
    # The statement is built once per number of steps; each start only adapts its values,
    # on this thread's connection looked up once (not through the proxy for each value).
    db = connections[DEFAULT_DB_ALIAS]
    version: list[Any] = []
    if definitions is not None:
        steps_field = DefinitionVersion._meta.get_field("steps")
        version = [
            saga.definition_version,
            saga.name,
            steps_field.get_db_prep_save(definitions, db),
            saga.created_at,
        ]
    params = [
        *version,
        *_insert_params(Saga, [saga], db),
        *_insert_params(SagaStep, steps, db),
        *(
            f.get_db_prep_save(value, db)
            for f, value in zip(event_columns()[1], event, strict=True)
        ),
    ]
    sql = _insert_saga_sql(len(steps), notice=notice, version=bool(version))
    with engine_cursor(db) as cursor:
        # (If the key was taken, the COMMIT ends an empty transaction: harmless.)
        execute(db, cursor, sql, params, commit=commit)
        count, event_id, notice_id = cursor.fetchone()
    return (event_id, notice_id or 0) if count == 1 else None


@cache
def _insert_saga_sql(step_count: int, *, notice: bool, version: bool) -> str:
    saga_columns, saga_row = _insert_columns(Saga)
    step_columns, step_row = _insert_columns(SagaStep)
    columns_of_events, event_fields = event_columns()
    event_row = "(" + ", ".join(f"%s::{f.db_type(connection)}" for f in event_fields) + ")"
    q = connection.ops.quote_name
    noticed = (
        f", n AS (INSERT INTO {q(SagaNotice._meta.db_table)} "
        "(saga_id, first_event_id, last_event_id, created_at) "
        "SELECT s.id, ev.id, ev.id, clock_timestamp() FROM s, ev RETURNING id) "
        if notice
        else " "
    )
    # The version first, whether or not the saga is inserted: it is the same for every saga
    # that names its digest. `store_version` committed it already, so this inserts nothing
    # and waits for no one; it is here for a table emptied since.
    stored = (
        f"dv AS (INSERT INTO {q(DefinitionVersion._meta.db_table)} "
        "(digest, name, steps, created_at) VALUES (%s, %s, %s::jsonb, %s::timestamptz) "
        "ON CONFLICT (digest) DO NOTHING), "
        if version
        else ""
    )
    return (
        f"WITH {stored}s AS (INSERT INTO {q(Saga._meta.db_table)} ({saga_columns}) "
        f"VALUES {saga_row} "
        "ON CONFLICT (name, idempotency_key) WHERE idempotency_key IS NOT NULL "
        "DO NOTHING RETURNING id), "
        f"st AS (INSERT INTO {q(SagaStep._meta.db_table)} ({step_columns}) "
        f"SELECT * FROM (VALUES {', '.join([step_row] * step_count)}) v "
        "WHERE EXISTS (SELECT FROM s)), "
        f"ev AS (INSERT INTO {q(SagaEvent._meta.db_table)} ({columns_of_events}) "
        f"SELECT * FROM (VALUES {event_row}) e WHERE EXISTS (SELECT FROM s) RETURNING id)"
        f"{noticed}"
        "SELECT (SELECT count(*) FROM s), (SELECT id FROM ev), "
        + ("(SELECT id FROM n)" if notice else "NULL")
    )


@cache
def _insert_fields(model: type[Model]) -> list[Field[Any, Any]]:
    """The fields a new row is inserted with: all but an auto-incremented key."""
    return [
        f
        for f in model._meta.concrete_fields
        if isinstance(f, Field) and not (f.primary_key and getattr(f, "db_returning", False))
    ]


def _insert_columns(model: type[Model]) -> tuple[str, str]:
    """Columns, and a typed VALUES row, to insert rows of `model`."""
    fields = _insert_fields(model)
    row = "(" + ", ".join(f"%s::{f.db_type(connection)}" for f in fields) + ")"
    return ", ".join(column(f) for f in fields), row


def _insert_params(model: type[Model], instances: list[Any], db: Any) -> list[Any]:
    fields = _insert_fields(model)
    return [
        f.get_db_prep_save(getattr(instance, f.attname), db)
        for instance in instances
        for f in fields
    ]
