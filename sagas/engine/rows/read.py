"""Reading a saga: its row locked and its steps in one round trip; its timeline where a halted
or resumed compensation needs it (rare)."""

from __future__ import annotations

import datetime
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cache
from typing import Any, cast
from uuid import UUID

from django.db import NotSupportedError, OperationalError, connection
from django.db.models import Field
from django.db.transaction import TransactionManagementError

from ...exceptions import SagaBusy
from ...models import EventKind, Saga, SagaEvent, SagaMember, SagaStep
from .cursors import column, default_db, read_cursor
from .definitions import definitions
from .objects import SagaRow, StepRow

# The bounds of an attempt's session, set after the saga's lock is taken (the engine's own
# wait for it is not the attempt's), for the rest of the transaction: no statement outlives the
# attempt's hard time limit, nor a lock wait, nor the session idle in its transaction during
# the action's external call (and a margin), and a statement running when the attempt's
# process is killed ends within a second (PostgreSQL checks that the client is still there).
SESSION_BOUNDS_SQL = (
    "SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true), "
    "set_config('idle_in_transaction_session_timeout', %s, true), "
    "set_config('client_connection_check_interval', '1000', true)"
)
IDLE_MARGIN = 5  # seconds


def session_bounds(bound: float) -> list[str]:
    limit = int(bound * 1000)
    return [str(limit), str(limit), str(limit + IDLE_MARGIN * 1000)]


def read_locked(
    saga_id: UUID | str, *, wait: float | None, lock: bool = True, bound: float | None = None
) -> tuple[SagaRow, list[StepRow]]:
    """Lock the saga row, then read its steps; see `sagas.engine.unit.lock`. Without `lock`,
    read them as they are (`sagas.engine.unit.peek`). With `bound`, bound the session
    (`SESSION_BOUNDS_SQL`) in the same round trip."""
    read = _read(saga_id, wait=wait, lock=lock, bound=bound)
    return read.saga, read.steps


def read_locked_with_members(
    saga_id: UUID | str, *, bound: float | None = None
) -> tuple[SagaRow, list[StepRow], list[SagaMember]]:
    """`read_locked`, and the saga's group members as they are (its lock keeps them so but
    for a member's attempt, which holds its own row), in the same round trip."""
    read = _read(saga_id, wait=None, lock=True, bound=bound, members=True)
    return read.saga, read.steps, read.members


def read_member_locked(
    saga_id: UUID | str, index: int, position: int, *, bound: float | None = None
) -> tuple[SagaMember | None, SagaRow, list[StepRow]]:
    """Lock a group member's row (an attempt of its action or compensation holds it), then
    read its saga and steps as they are, without the saga's lock, in one round trip; with
    `bound`, bound the session too. The member is None if it does not exist."""
    read = _read(saga_id, wait=None, lock=False, bound=bound, member=(index, position))
    return read.member, read.saga, read.steps


@dataclass
class _Read:
    saga: SagaRow
    steps: list[StepRow]
    member: SagaMember | None = None
    members: list[SagaMember] = field(default_factory=list)


def _read(
    saga_id: UUID | str,
    *,
    wait: float | None,
    lock: bool,
    bound: float | None,
    member: tuple[int, int] | None = None,
    members: bool = False,
) -> _Read:
    """The statements of a read, sent together (psycopg's pipeline mode): a member's lock
    first if asked, the saga's row (locked or not), the session's bounds, its steps, and its
    members if asked. The server runs them one after the other."""
    db = default_db()
    if not db.in_atomic_block:  # as select_for_update() would refuse
        raise TransactionManagementError("lock() must run inside a transaction")
    saga_sql, steps_sql = _lock_sql(lock)
    key = UUID(str(saga_id))
    member_values: Any = None
    members_values: list[Any] = []
    try:
        # A step's read needs no third cursor: none is made on its path.
        third: Any = read_cursor(db) if member or members else nullcontext()
        with read_cursor(db) as cursor, read_cursor(db) as steps_cursor, third as members_cursor:
            # Results are read after the pipeline's end, which fetches them all at once.
            with db.wrap_database_errors, db.connection.pipeline():
                if wait is not None:
                    cursor.execute(f"SET LOCAL lock_timeout = '{int(wait * 1000)}ms'")
                if member is not None:
                    members_cursor.execute(_member_sql(one=True), [key, *member])
                cursor.execute(saga_sql, [key])
                if bound is not None:
                    steps_cursor.execute(SESSION_BOUNDS_SQL, session_bounds(bound))
                steps_cursor.execute(steps_sql, [key])
                if members:
                    members_cursor.execute(_member_sql(one=False), [key])
            saga_values = cursor.fetchone()
            step_values = steps_cursor.fetchall()
            if member is not None:
                member_values = members_cursor.fetchone()
            elif members:
                members_values = members_cursor.fetchall()
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
    return _Read(
        saga,
        steps,
        member=_member(member_values, db) if member_values is not None else None,
        members=[_member(values, db) for values in members_values],
    )


def _member(values: tuple[Any, ...], db: Any) -> SagaMember:
    """A member's row as the model's instance (as a queryset would make it)."""
    fields = SagaMember._meta.concrete_fields
    converted = [
        f.from_db_value(v, None, db) if hasattr(f, "from_db_value") else v
        for f, v in zip(fields, values, strict=True)
    ]
    return SagaMember.from_db(db.alias, [f.attname for f in fields], converted)


@cache
def _member_sql(*, one: bool) -> str:
    """A member's row locked (`one`), or every member of a saga, by group then position."""
    q = connection.ops.quote_name
    members = q(SagaMember._meta.db_table)
    columns = ", ".join(column(f) for f in SagaMember._meta.concrete_fields)
    if one:
        where = f"saga_id = %s AND {q('stage')} = %s AND {q('position')} = %s"
        return f"SELECT {columns} FROM {members} WHERE {where} FOR NO KEY UPDATE"
    order = f"{q('stage')}, {q('position')}"
    return f"SELECT {columns} FROM {members} WHERE saga_id = %s ORDER BY {order}"


def _replanned(exc: NotSupportedError) -> bool:
    """Whether PostgreSQL refused a prepared statement whose result a change of its tables
    altered ("cached plan must not change result type")."""
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == "0A000" and "cached plan" in str(cause)


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
    # Not the steps' definitions: they come from the cache of the saga's definition version;
    # nor the columns a row class says the engine never reads.
    unread = {"stored_definition", *getattr(cls, "unread", ())}
    return [f for f in cls.model._meta.concrete_fields if f.attname not in unread]


@cache
def _lock_sql(lock: bool = True) -> tuple[str, str]:
    q = connection.ops.quote_name
    sagas, steps = q(Saga._meta.db_table), q(SagaStep._meta.db_table)
    saga_columns = ", ".join(column(f) for f in _read_fields(SagaRow))
    step_columns = ", ".join(column(f) for f in _read_fields(StepRow))
    # FOR NO KEY UPDATE: exclusive among the engine's lockers (and the sweeper's and purge's FOR
    # UPDATE), but an insert that only references the saga (a signal kept while a step runs, a
    # bulk action's item) checks its foreign key without waiting for the step to end.
    return (
        f"SELECT {saga_columns} FROM {sagas} WHERE id = %s"
        + (" FOR NO KEY UPDATE" if lock else ""),
        f"SELECT {step_columns} FROM {steps} WHERE saga_id = %s ORDER BY {q('index')}",
    )


# -- the timeline ----------------------------------------------------------------------------


def completed_steps(saga_id: UUID) -> set[int]:
    """The indexes of the saga's steps that completed, by their action or by an operator's
    hand (`operator_skip`): each completes at most once."""
    done = [EventKind.STEP_COMPLETED, EventKind.OPERATOR_SKIP]
    # A group's members' events name their group's stage, with the member in their detail.
    events = SagaEvent.objects.filter(saga_id=saga_id, kind__in=done).exclude(
        detail__has_key="member"
    )
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


def database_now() -> datetime.datetime:
    """The database's clock: the one every fence is set and read on, whichever host asks."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement_timestamp()")
        return cast(datetime.datetime, cursor.fetchone()[0])
