"""The rows the engine reads and writes, as plain objects, and the SQL it sends.

A step's hot path is: the transaction's BEGIN (psycopg sends it alone), the saga's lock and
the read of its steps in one round trip, the step's own statements, then the changed rows and
the events in one statement sent with the COMMIT. No queryset is built and no model instance
made on that path: a row is an object with the table's columns as attributes, and the
statements are built from the models' fields once. Where the project allows prepared
statements (`prepare_threshold` in the database's OPTIONS), psycopg prepares them (`_cursor`).

The steps' definitions, copied into their rows when a saga starts, are the same for every saga
started from the same definition: the saga row names them by a digest (`definition_version`),
and a process reads and parses each version once.
"""

from __future__ import annotations

import datetime
from functools import cache
from typing import Any, NamedTuple, cast
from uuid import UUID

from django.db import (
    DEFAULT_DB_ALIAS,
    NotSupportedError,
    OperationalError,
    connection,
    connections,
)
from django.db.backends.postgresql.base import ServerBindingCursor
from django.db.backends.postgresql.psycopg_any import register_tzloader
from django.db.models import Field, Model
from django.db.transaction import TransactionManagementError
from psycopg import ClientCursor
from psycopg import adapters as psycopg_adapters
from psycopg.postgres import types as pg_types
from psycopg.pq import Format

from ..definitions import RetryPolicy
from ..exceptions import SagaBusy
from ..models import Direction, EventKind, Saga, SagaEvent, SagaStep


class SagaRow:
    """A saga's row (`sagas.models.Saga`'s columns)."""

    __slots__ = (
        "business_key",
        "created_at",
        "created_by_id",
        "current_step",
        "deadline_at",
        "definition_version",
        "direction",
        "epoch",
        "error_code",
        "error_message",
        "finished_at",
        "id",
        "idempotency_key",
        "input",
        "name",
        "options",
        "recovery_attempts",
        "status",
        "trace_context",
        "updated_at",
    )
    model = Saga

    id: UUID
    name: str
    status: str
    direction: str
    epoch: int
    input: dict[str, Any]
    options: dict[str, Any]
    definition_version: str
    current_step: int
    error_code: str
    error_message: str
    idempotency_key: str | None
    business_key: str | None
    recovery_attempts: int
    created_by_id: int | None
    deadline_at: Any
    trace_context: str
    created_at: Any
    updated_at: Any
    finished_at: Any

    @property
    def pk(self) -> UUID:
        return self.id

    @property
    def is_backward(self) -> bool:
        return self.direction == Direction.BACKWARD


class StepRow:
    """A step's row (`sagas.models.SagaStep`'s columns); `definition` comes from the cache of
    its saga's definition version."""

    __slots__ = (
        "attempts",
        "compensated_at",
        "compensation_attempts",
        "definition",
        "error_code",
        "error_message",
        "finished_at",
        "id",
        "index",
        "name",
        "output",
        "saga_id",
        "started_at",
        "status",
    )
    model = SagaStep

    id: int
    saga_id: UUID
    index: int
    name: str
    status: str
    definition: dict[str, Any]
    attempts: int
    compensation_attempts: int
    output: Any
    error_code: str
    error_message: str
    started_at: Any
    finished_at: Any
    compensated_at: Any

    @property
    def pk(self) -> int:
        return self.id

    @property
    def compensation(self) -> str | None:
        return self.definition.get("compensation")


class EventRow(NamedTuple):
    """An event to insert (`sagas.models.SagaEvent`'s columns but its id)."""

    saga_id: Any
    step_index: int | None
    step_name: str
    kind: str
    detail: dict[str, Any]
    created_at: Any


Sql = tuple[str, list[Any]]
Row = SagaRow | StepRow


# -- reading ---------------------------------------------------------------------------------


def read_locked(
    saga_id: UUID | str, *, wait: float | None, lock: bool = True
) -> tuple[SagaRow, list[StepRow]]:
    """Lock the saga row, then read its steps; see `sagas.engine.unit.lock`. Without `lock`,
    read them as they are (`sagas.engine.unit.peek`)."""
    db = _db()
    if not db.in_atomic_block:  # as select_for_update() would refuse
        raise TransactionManagementError("lock() must run inside a transaction")
    saga_sql, steps_sql = _lock_sql(lock)
    key = UUID(str(saga_id))
    try:
        with _read_cursor(db) as cursor, _read_cursor(db) as steps_cursor:
            # Results are read after the pipeline's end, which fetches them all at once.
            with db.wrap_database_errors, db.connection.pipeline():
                if wait is not None:
                    cursor.execute(f"SET LOCAL lock_timeout = '{int(wait * 1000)}ms'")
                cursor.execute(saga_sql, [key])
                steps_cursor.execute(steps_sql, [key])
            saga_values = cursor.fetchone()
            step_values = steps_cursor.fetchall()
            if wait is not None:
                cursor.execute("SET LOCAL lock_timeout = 0")
    except OperationalError as exc:
        if wait is not None and getattr(exc.__cause__, "sqlstate", None) == "55P03":
            raise SagaBusy("The saga is busy (a step is running); try again shortly.") from None
        raise
    except NotSupportedError as exc:
        if not _replanned(exc):
            raise
        # A migration changed a column these prepared statements read. The transaction's
        # rollback makes psycopg drop its prepared statements: as for a database restart,
        # the caller tries again later (a task is sent again; no attempt is spent).
        raise OperationalError(
            "The saga's statements were prepared before a change to its tables; "
            "they are prepared again on the next try."
        ) from exc
    if saga_values is None:
        raise Saga.DoesNotExist(f"no saga {saga_id}")
    saga = _row(SagaRow, saga_values, db)
    steps = [_row(StepRow, values, db) for values in step_values]
    for step, definition in zip(steps, definitions(saga), strict=True):
        step.definition = definition
    return saga, steps


def _db() -> Any:
    """The default database's connection wrapper, looked up once by each caller: every
    attribute read through `django.db.connection` (a proxy) looks it up again."""
    return connections[DEFAULT_DB_ALIAS]


TIMESTAMPTZ_OID = pg_types["timestamptz"].oid


def _cursor(db: Any) -> Any:
    """A cursor for the engine's statements on `db`: Django's own, unless the project allows
    prepared statements on the connection (`OPTIONS["prepare_threshold"]`, which Django leaves
    at None, none, for connection poolers' sake) while Django binds parameters on the client,
    which never prepares. Then it binds them on the server, as Django's `server_side_binding`
    cursors do, so that psycopg prepares each statement the engine runs that many times and
    PostgreSQL stops parsing and planning it for every step. The project's own queries keep
    their binding. While Django logs queries (DEBUG, `CaptureQueriesContext`), Django's own
    cursor: its log would show a prepared statement's text as None."""
    db.close_if_health_check_failed()
    db.ensure_connection()
    raw = db.connection
    if (
        raw.prepare_threshold is None
        or db.queries_logged
        or not issubclass(raw.cursor_factory, ClientCursor)
    ):
        return db.cursor()
    with db.wrap_database_errors:
        cursor = cast(Any, ServerBindingCursor)(raw)  # (typed as psycopg2's by django-stubs)
        # As Django's `create_cursor`: the connection's time zone unless the project's differs.
        if db.timezone != raw.adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT).timezone:
            register_tzloader(db.timezone, cursor)
        db.validate_thread_sharing()
        return db.make_debug_cursor(cursor) if db.queries_logged else db.make_cursor(cursor)


def _replanned(exc: NotSupportedError) -> bool:
    """Whether PostgreSQL refused a prepared statement whose result a change of its tables
    altered ("cached plan must not change result type")."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == "0A000" and "cached plan" in str(cause)


def _read_cursor(db: Any) -> Any:
    """`_cursor`, reading times with psycopg's own loader (in C with psycopg's binary or C
    implementation) where Django's, written in Python, would only give them the same UTC
    time zone: with USE_TZ, Django sets the connection's time zone to UTC."""
    cursor = _cursor(db)
    loader = _utc_loader()
    if db.timezone is datetime.UTC and loader is not None:
        cursor.cursor.adapters.register_loader(TIMESTAMPTZ_OID, loader)
    return cursor


@cache
def _utc_loader() -> Any:
    return psycopg_adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT)


def _row(cls: Any, values: tuple[Any, ...], db: Any) -> Any:
    row = object.__new__(cls)
    names, converters = _layout(cls)
    for name, value in zip(names, values, strict=True):
        object.__setattr__(row, name, value)
    for name, convert in converters:  # the JSON columns arrive as text
        object.__setattr__(row, name, convert(getattr(row, name), None, db))
    return row


@cache
def _layout(cls: Any) -> tuple[list[str], list[tuple[str, Any]]]:
    """The attributes a row of `cls` is read into, in `_lock_sql`'s order, and the converters
    of those that need one (as a queryset would apply them)."""
    fields = _read_fields(cls)
    converters = [(f.attname, f.from_db_value) for f in fields if hasattr(f, "from_db_value")]
    return [f.attname for f in fields], converters


def _read_fields(cls: Any) -> list[Field[Any, Any]]:
    # Not the steps' definitions: they come from the cache of the saga's definition version.
    return [f for f in cls.model._meta.concrete_fields if f.attname != "definition"]


@cache
def _lock_sql(lock: bool = True) -> tuple[str, str]:
    q = connection.ops.quote_name
    sagas, steps = q(Saga._meta.db_table), q(SagaStep._meta.db_table)
    saga_columns = ", ".join(_column(f) for f in _read_fields(SagaRow))
    step_columns = ", ".join(_column(f) for f in _read_fields(StepRow))
    return (
        f"SELECT {saga_columns} FROM {sagas} WHERE id = %s" + (" FOR UPDATE" if lock else ""),
        f"SELECT {step_columns} FROM {steps} WHERE saga_id = %s ORDER BY {q('index')}",
    )


# -- the steps' definitions, parsed once per version --------------------------------------


class Definition(dict[str, Any]):
    """A step's definition (the JSON in its row), with its retry policies parsed beside it."""

    __slots__ = ("policies",)

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self.policies: dict[str, RetryPolicy] = {}


_definitions: dict[str, tuple[Definition, ...]] = {}


def definitions(saga: SagaRow) -> tuple[Definition, ...]:
    """The step definitions the saga started with, read from its step rows at most once per
    definition version and process (sagas from before versions: every time)."""
    version = saga.definition_version
    cached = _definitions.get(version) if version else None
    if cached is not None:
        return cached
    with connection.cursor() as cursor:
        cursor.execute(_definitions_sql(), [saga.id])
        field = SagaStep._meta.get_field("definition")
        loaded = tuple(
            Definition(field.from_db_value(value, None, connection))  # type: ignore[attr-defined,arg-type]
            for (value,) in cursor.fetchall()
        )
    if version:
        _definitions[version] = loaded
    return loaded


@cache
def _definitions_sql() -> str:
    q = connection.ops.quote_name
    table = q(SagaStep._meta.db_table)
    return f"SELECT {q('definition')} FROM {table} WHERE saga_id = %s ORDER BY {q('index')}"


def policy(definition: dict[str, Any], key: str) -> RetryPolicy:
    """A step's retry policy (`retry` or `compensation_retry`), parsed once per definition."""
    if not isinstance(definition, Definition):
        return RetryPolicy.from_dict(definition[key])
    if key not in definition.policies:
        definition.policies[key] = RetryPolicy.from_dict(definition[key])
    return definition.policies[key]


# -- the timeline, read where a halted or resumed compensation needs it (rare) ---------------


def completed_steps(saga_id: UUID) -> set[int]:
    """The indexes of the saga's steps that completed: each completes at most once."""
    events = SagaEvent.objects.filter(saga_id=saga_id, kind=EventKind.STEP_COMPLETED)
    return set(events.values_list("step_index", flat=True))  # type: ignore[arg-type]


def last_cause(saga_id: UUID) -> dict[str, str] | None:
    """Why a backward saga compensates, as remembered when it last stopped for an operator
    (`sagas.engine.unit.Unit.remember_cause`)."""
    detail = (
        SagaEvent.objects.filter(saga_id=saga_id, kind=EventKind.SAGA_FAILED)
        .filter(detail__has_key="cause")
        .order_by("-id")
        .values_list("detail", flat=True)
        .first()
    )
    return detail["cause"] if detail else None


# -- writing ---------------------------------------------------------------------------------


def update_sql(row: Any, attributes: set[str]) -> Sql:
    """UPDATE the given attributes of a row (or of a model instance of the same table)."""
    model: Any = row.model if isinstance(row, SagaRow | StepRow) else type(row)
    db = _db()
    fields = _fields(model)
    names = sorted(attributes)
    assignments = ", ".join(f"{fields[name][0]} = %s" for name in names)
    params = [fields[name][1].get_db_prep_save(getattr(row, name), db) for name in names]
    table = db.ops.quote_name(model._meta.db_table)
    return f"UPDATE {table} SET {assignments} WHERE id = %s", [*params, row.pk]


@cache
def _fields(model: Any) -> dict[str, tuple[str, Field[Any, Any]]]:
    return {f.attname: (_column(f), f) for f in model._meta.concrete_fields}


def insert_events_sql(events: list[EventRow]) -> Sql | None:
    if not events:
        return None
    columns, fields = _event_columns()
    db = _db()
    row = "(" + ", ".join(["%s"] * len(fields)) + ")"
    params = [
        field.get_db_prep_save(value, db)
        for event in events
        for field, value in zip(fields, event, strict=True)
    ]
    table = db.ops.quote_name(SagaEvent._meta.db_table)
    return f"INSERT INTO {table} ({columns}) VALUES {', '.join([row] * len(events))}", params


@cache
def _event_columns() -> tuple[str, list[Field[Any, Any]]]:
    fields = [SagaEvent._meta.get_field(name) for name in EventRow._fields]
    concrete = [f for f in fields if isinstance(f, Field)]
    return ", ".join(_column(f) for f in concrete), concrete


def execute_as_one(writes: list[Sql | None], *, commit: bool) -> None:
    """Run several INSERT/UPDATE statements as one, with PostgreSQL's writable CTEs; with
    `commit`, in the outermost transaction, send the COMMIT with it (one round trip)."""
    statements = [w for w in writes if w is not None]
    *first, last = statements
    ctes = ", ".join(f"w{i} AS ({sql})" for i, (sql, _) in enumerate(first))
    sql = (f"WITH {ctes} " if ctes else "") + last[0]
    params = [p for _, ps in first for p in ps] + last[1]
    db = _db()
    with _cursor(db) as cursor:
        _execute(db, cursor, sql, params, commit=commit)


def _execute(db: Any, cursor: Any, sql: str, params: list[Any], *, commit: bool) -> None:
    """Execute on `cursor`, one of `db`'s; with `commit`, in the outermost transaction, send
    the COMMIT in the same round trip (psycopg's pipeline mode)."""
    if commit and _outermost_transaction(db):
        with (
            db.wrap_database_errors,
            db.connection.pipeline(),
            _cursor(db) as commit_cursor,
        ):
            cursor.execute(sql, params)
            commit_cursor.execute("COMMIT")
    else:
        cursor.execute(sql, params)


def _outermost_transaction(db: Any) -> bool:
    """Whether the current `atomic()` block is a transaction of its own, not a savepoint in
    someone else's (whose commit is not the engine's to send)."""
    return (
        db.in_atomic_block
        and db.commit_on_exit
        and not db.savepoint_ids
        and db.connection is not None
    )


def _column(field: Any) -> str:
    assert isinstance(field, Field) and field.column, f"{field} is not a column"
    return connection.ops.quote_name(field.column)


# -- starting --------------------------------------------------------------------------------


def insert_saga(saga: Saga, steps: list[SagaStep], event: EventRow, *, commit: bool) -> bool:
    """Insert a new saga, its steps and its first event in one statement.

    Returns False, inserting nothing, if a saga with the same name and idempotency key exists.
    Any other unique constraint (one saga in flight per key) raises its IntegrityError.
    With `commit`, in the outermost transaction, the COMMIT goes with it.
    """
    # The statement is built once per number of steps; each start only adapts its values,
    # on this thread's connection looked up once (not through the proxy for each value).
    db = connections[DEFAULT_DB_ALIAS]
    params = [
        *_insert_params(Saga, [saga], db),
        *_insert_params(SagaStep, steps, db),
        *(
            f.get_db_prep_save(value, db)
            for f, value in zip(_event_columns()[1], event, strict=True)
        ),
    ]
    sql = _insert_saga_sql(len(steps))
    with _cursor(db) as cursor:
        # (If the key was taken, the COMMIT ends an empty transaction: harmless.)
        _execute(db, cursor, sql, params, commit=commit)
        (count,) = cursor.fetchone()
    return bool(count == 1)


@cache
def _insert_saga_sql(step_count: int) -> str:
    saga_columns, saga_row = _insert_columns(Saga)
    step_columns, step_row = _insert_columns(SagaStep)
    event_columns, event_fields = _event_columns()
    event_row = "(" + ", ".join(f"%s::{f.db_type(connection)}" for f in event_fields) + ")"
    q = connection.ops.quote_name
    return (
        f"WITH s AS (INSERT INTO {q(Saga._meta.db_table)} ({saga_columns}) VALUES {saga_row} "
        "ON CONFLICT (name, idempotency_key) WHERE idempotency_key IS NOT NULL "
        "DO NOTHING RETURNING id), "
        f"st AS (INSERT INTO {q(SagaStep._meta.db_table)} ({step_columns}) "
        f"SELECT * FROM (VALUES {', '.join([step_row] * step_count)}) v "
        "WHERE EXISTS (SELECT FROM s)), "
        f"ev AS (INSERT INTO {q(SagaEvent._meta.db_table)} ({event_columns}) "
        f"SELECT * FROM (VALUES {event_row}) e WHERE EXISTS (SELECT FROM s)) "
        "SELECT count(*) FROM s"
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
    return ", ".join(_column(f) for f in fields), row


def _insert_params(model: type[Model], instances: list[Any], db: Any) -> list[Any]:
    fields = _insert_fields(model)
    return [
        f.get_db_prep_save(getattr(instance, f.attname), db)
        for instance in instances
        for f in fields
    ]
