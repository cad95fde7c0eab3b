"""The connection and cursors the engine's statements run on, and their COMMIT sent with the
last of them."""

from __future__ import annotations

import datetime
from functools import cache
from typing import Any, cast

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.postgresql.base import ServerBindingCursor
from django.db.backends.postgresql.psycopg_any import register_tzloader
from django.db.models import Field
from psycopg import ClientCursor
from psycopg import adapters as psycopg_adapters
from psycopg.postgres import types as pg_types
from psycopg.pq import Format


def default_db() -> Any:
    """The default database's connection wrapper, looked up once by each caller: every
    attribute read through `django.db.connection` (a proxy) looks it up again."""
    return connections[DEFAULT_DB_ALIAS]


TIMESTAMPTZ_OID = pg_types["timestamptz"].oid


def engine_cursor(db: Any) -> Any:
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


def read_cursor(db: Any) -> Any:
    """`engine_cursor`, reading times with psycopg's own loader (in C with psycopg's binary or C
    implementation) where Django's, written in Python, would only give them the same UTC
    time zone: with USE_TZ, Django sets the connection's time zone to UTC."""
    cursor = engine_cursor(db)
    loader = _utc_loader()
    if db.timezone is datetime.UTC and loader is not None:
        cursor.cursor.adapters.register_loader(TIMESTAMPTZ_OID, loader)
    return cursor


@cache
def _utc_loader() -> Any:
    return psycopg_adapters.get_loader(TIMESTAMPTZ_OID, Format.TEXT)


def execute(db: Any, cursor: Any, sql: str, params: list[Any], *, commit: bool) -> None:
    """Execute on `cursor`, one of `db`'s; with `commit`, in the outermost transaction, send
    the COMMIT in the same round trip (psycopg's pipeline mode)."""
    if commit and outermost_transaction(db):
        with (
            db.wrap_database_errors,
            db.connection.pipeline(),
            engine_cursor(db) as commit_cursor,
        ):
            cursor.execute(sql, params)
            commit_cursor.execute("COMMIT")
    else:
        cursor.execute(sql, params)


def outermost_transaction(db: Any) -> bool:
    """Whether the current `atomic()` block is a transaction of its own, not a savepoint in
    someone else's (whose commit is not the engine's to send)."""
    return (
        db.in_atomic_block
        and db.commit_on_exit
        and not db.savepoint_ids
        and db.connection is not None
    )


def column(field: Any) -> str:
    assert isinstance(field, Field) and field.column, f"{field} is not a column"
    return connection.ops.quote_name(field.column)
