"""The engine's statements on the hot path: the saga's lock and the read of its steps in one
round trip, the write and its COMMIT in another (psycopg's pipeline mode), with client-side
binding (Django's default), with server-side binding (the `server_side_binding` option), and
with client-side binding where the project allows prepared statements (`prepare_threshold`):
the engine's own statements are then bound on the server and prepared."""

from __future__ import annotations

import threading
import time
import uuid

import psycopg
import pytest
from django.db import OperationalError, connection, connections, transaction
from django.db.backends.postgresql.base import ServerBindingCursor
from django.test.utils import CaptureQueriesContext

from sagas import engine
from sagas.engine import unit
from sagas.exceptions import SagaBusy
from sagas.models import Saga
from sagas.services import saga_start
from tests.conftest import lose_messages

pytestmark = pytest.mark.django_db(transaction=True)


PREPARED = "client-side binding, prepared statements allowed"


@pytest.fixture(params=["client-side binding", "server-side binding", PREPARED])
def binding(request):
    connection.ensure_connection()
    factory = connection.connection.cursor_factory
    threshold = connection.connection.prepare_threshold
    if request.param == "server-side binding":
        connection.connection.cursor_factory = ServerBindingCursor
    if request.param == PREPARED:
        connection.connection.prepare_threshold = 0  # prepared from their first execution
    yield request.param
    with connection.cursor() as cursor:  # still the same connection, with the binding asked for
        assert isinstance(cursor.cursor, ServerBindingCursor) == (
            request.param == "server-side binding"
        )
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        prepared = [statement for (statement,) in cursor.fetchall()]
    # Prepared: the engine's statements only (the project's keep their binding), and only where
    # the project allows them. (A rollback makes psycopg deallocate them all.)
    assert not any("pg_prepared_statements" in statement for statement in prepared)
    if request.param != PREPARED:
        assert prepared == []
    connection.connection.cursor_factory = factory
    connection.connection.prepare_threshold = threshold


def test_a_step_locks_reads_writes_and_commits_with_either_binding(binding, monkeypatch):
    lose_messages(monkeypatch)  # the steps run here, one by one
    saga, _ = saga_start(name="snapshot_demo", input={})
    for index in range(2):
        sent: list[str] = []

        def record(execute, sql, params, many, context, sent=sent):
            # (The definitions: read once per definition version and process.)
            if '"sagas_definitionversion"' not in sql and not sql.startswith('SELECT "definition"'):
                sent.append(sql)
            return execute(sql, params, many, context)

        with connection.execute_wrapper(record):
            assert engine.step_attempt(str(saga.pk), index, epoch=saga.epoch).kind == "done"
        assert len(sent) == 4, sent  # two pipelines of two statements
        assert sent[0].endswith("FOR NO KEY UPDATE") and sent[1].startswith("SELECT")
        assert sent[2].startswith(("UPDATE", "WITH")) and sent[3] == "COMMIT"
    saga.refresh_from_db()
    assert saga.status == "completed"
    assert list(saga.steps.values_list("status", flat=True)) == ["completed", "completed"]
    if binding == PREPARED:
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            prepared = {statement for (statement,) in cursor.fetchall()}
        assert any(statement.endswith("FOR NO KEY UPDATE") for statement in prepared), prepared
        assert "COMMIT" in prepared and any(s.startswith("WITH dv AS (INSERT") for s in prepared)


def test_a_missing_saga_is_reported_as_missing(binding):
    with pytest.raises(Saga.DoesNotExist), transaction.atomic():
        unit.lock(uuid.uuid4())


def test_a_bounded_wait_for_the_lock_answers_busy_and_leaves_no_timeout_behind(binding):
    saga, _ = saga_start(name="snapshot_demo", input={})
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        try:
            with transaction.atomic():
                unit.lock(saga.pk)
                locked.set()
                release.wait(30)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert locked.wait(30)
        started = time.monotonic()
        with pytest.raises(SagaBusy), transaction.atomic():
            unit.lock(saga.pk, wait=0.2)
        assert time.monotonic() - started < 5
    finally:
        release.set()
        holder.join()
    with transaction.atomic():
        locked_unit = unit.lock(saga.pk, wait=5)
        with connection.cursor() as cursor:
            cursor.execute("SHOW lock_timeout")
            assert cursor.fetchone() == ("0",)
    assert [step.index for step in locked_unit.steps] == [0, 1]


@pytest.fixture
def prepared_at_once():
    """Prepared statements allowed on this connection, from their first execution."""
    connection.ensure_connection()
    threshold = connection.connection.prepare_threshold
    connection.connection.prepare_threshold = 0
    yield
    connection.connection.prepare_threshold = threshold


def test_while_django_logs_queries_the_log_has_each_statement_of_the_engine(
    prepared_at_once, monkeypatch
):
    """A prepared statement's text is None in Django's query log (DEBUG, the debug toolbar,
    `CaptureQueriesContext`): while Django logs, the engine prepares nothing."""
    lose_messages(monkeypatch)
    for _ in range(2):  # the second time, what is prepared would run by name
        with CaptureQueriesContext(connection) as queries:
            saga, _ = saga_start(name="snapshot_demo", input={})
            for index in range(2):
                engine.step_attempt(str(saga.pk), index, epoch=saga.epoch)
        logged = [query["sql"] for query in queries.captured_queries]
        assert all(isinstance(sql, str) for sql in logged), logged
        assert any(sql.endswith("FOR NO KEY UPDATE") for sql in logged), logged


def alter_table(change: str) -> None:
    """Alter the sagas' table on a connection of its own, as a migration run elsewhere would
    (psycopg forgets its prepared statements when it sees an ALTER on their own connection)."""
    params = {**connection.get_connection_params(), "autocommit": True}
    with psycopg.connect(**params) as other:
        other.execute(f"ALTER TABLE sagas_saga {change}")


def test_a_migration_that_changes_a_column_the_engine_reads_fails_no_step(
    prepared_at_once, monkeypatch
):
    """PostgreSQL refuses to run a prepared statement whose result's type a migration changed
    ("cached plan must not change result type"). The engine reports it as the database being
    unavailable, for the task to be sent again; the rollback has made psycopg drop its prepared
    statements, so the next attempt runs, and no attempt of the step is spent."""
    lose_messages(monkeypatch)
    saga, _ = saga_start(name="snapshot_demo", input={})
    try:
        assert engine.step_attempt(str(saga.pk), 0, epoch=saga.epoch).kind == "done"
        alter_table("ALTER COLUMN recovery_attempts TYPE bigint")  # a deploy's migration
        with pytest.raises(OperationalError, match="prepared before a change"):
            engine.step_attempt(str(saga.pk), 1, epoch=saga.epoch)
        assert engine.step_attempt(str(saga.pk), 1, epoch=saga.epoch).kind == "done"
    finally:
        alter_table("ALTER COLUMN recovery_attempts TYPE integer")
    saga.refresh_from_db()
    assert saga.status == "completed"
    assert list(saga.steps.values_list("attempts", flat=True)) == [1, 1]


# -- rows that stay cheap to write -----------------------------------------------------------


def test_a_steps_write_is_a_hot_update():
    """A step's write changes no indexed column, nor one an index's predicate reads (the due
    waits' index is on `due_at`, set only while a wait waits): PostgreSQL then updates its row
    in place (HOT), touching no index."""
    saga, _ = saga_start(name="three_steps", input={})
    step = saga.steps.get(index=0)
    with transaction.atomic(), connection.cursor() as cursor:
        step.status, step.attempts = "completed", 1
        step.save(update_fields=["status", "attempts"])
        cursor.execute(
            "SELECT pg_stat_get_xact_tuples_updated(%s::regclass), "
            "pg_stat_get_xact_tuples_hot_updated(%s::regclass)",
            ["sagas_sagastep", "sagas_sagastep"],
        )
        assert cursor.fetchone() == (1, 1)


def test_the_waker_finds_the_due_waits_through_their_index():
    """However many steps the table holds, the due waits are read through their index."""
    from django.utils import timezone

    from sagas.models import SagaStep, StepStatus

    sagas = Saga.objects.bulk_create(
        Saga(name="history", status="completed", input={}) for _ in range(2000)
    )
    SagaStep.objects.bulk_create(
        SagaStep(saga=s, index=i, name=f"s{i}", status="completed", definition={})
        for s in sagas
        for i in range(3)
    )
    due = SagaStep.objects.filter(status=StepStatus.WAITING, due_at__lte=timezone.now())
    sql, params = due.values("pk").query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE sagas_sagastep")
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "saga_step_due_at_idx" in plan and "Seq Scan" not in plan, plan


def test_the_first_start_of_a_new_version_holds_up_no_other_start(binding, monkeypatch):
    """A saga of a definition version no saga has used yet, started in a transaction its caller
    keeps open: another start of the same version, elsewhere, neither waits for it to commit
    nor deadlocks with it (the version is committed on a connection of its own first)."""
    from sagas.definitions import SagaDefinition, Step, register
    from sagas.models import DefinitionVersion

    lose_messages(monkeypatch)
    # A time limit no other test uses: a digest no saga, nor this process, has used yet.
    name = f"new_version_{uuid.uuid4().hex[:8]}"
    limit = 3_600 + uuid.uuid4().int % 1_000_000
    register(SagaDefinition(name, [Step("a", action="tests.sagadefs.record", time_limit=limit)]))
    other: list[object] = []

    def start_elsewhere() -> None:
        try:
            other.append(saga_start(name=name, input={})[0].pk)
        finally:
            connections.close_all()

    with transaction.atomic():
        first, _ = saga_start(name=name, input={})
        thread = threading.Thread(target=start_elsewhere)
        thread.start()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the other start waited for this transaction"
    assert len(other) == 1 and Saga.objects.filter(pk__in=[first.pk, *other]).count() == 2
    digest = Saga.objects.get(pk=first.pk).definition_version
    assert DefinitionVersion.objects.filter(digest=digest, name=name).count() == 1
