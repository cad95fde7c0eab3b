"""Migration 0026: the definition versions of the sagas started before it are copied from
their rows, each from a saga whose rows hash to its digest; their rows keep their copies, and
the engine reads them either way."""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import connection, transaction
from django.db.migrations.executor import MigrationExecutor

from sagas.definitions import get_definition, snapshot_version
from sagas.engine.rows import read

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [("sagas", "0025_cheap_rows")]


def migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def add_saga(name: str, steps: list[dict], digest: str, created_at: str) -> uuid.UUID:
    """A saga as the code before 0026 started one: its rows hold their definitions."""
    saga_id = uuid.uuid4()
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO sagas_saga (id, name, status, direction, epoch, input, options, "
            "definition_version, current_step, error_code, error_message, recovery_attempts, "
            "trace_context, reconciliation, created_at, updated_at) VALUES (%s, %s, "
            "'running', 'forward', 1, '{}', '{}', %s, 0, '', '', 0, '', 'unchecked', %s, %s)",
            [saga_id, name, digest, created_at, created_at],
        )
        for index, step in enumerate(steps):
            cursor.execute(
                "INSERT INTO sagas_sagastep (saga_id, index, name, status, definition, "
                "attempts, compensation_attempts, error_code, error_message) "
                "VALUES (%s, %s, %s, 'pending', %s::jsonb, 0, 0, '', '')",
                [saga_id, index, f"s{index}", json.dumps(step)],
            )
    return saga_id


def test_versions_are_copied_from_rows_that_hash_to_them():
    steps, digest = get_definition("three_steps").snapshot()
    edited = [{**steps[0], "time_limit": 999}, *steps[1:]]
    migrate(BEFORE)
    try:
        # The earliest saga of the digest was changed by hand under it: passed over.
        add_saga("three_steps", edited, digest, "2026-01-01T00:00:00Z")
        kept = add_saga("three_steps", steps, digest, "2026-01-02T00:00:00Z")
        mine = add_saga("three_steps", edited, snapshot_version(edited), "2026-01-03T00:00:00Z")
        migrate([("sagas", "0026_definition_versions")])
        with connection.cursor() as cursor:
            cursor.execute("SELECT digest, steps FROM sagas_definitionversion")
            stored = {d: json.loads(s) if isinstance(s, str) else s for d, s in cursor.fetchall()}
        # Each digest from rows that hash to it: the edited saga's own digest too.
        assert stored[digest] == steps
        assert stored[snapshot_version(edited)] == edited
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM sagas_sagastep WHERE definition IS NULL")
            assert cursor.fetchone()[0] == 0  # no row rewritten
    finally:
        migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())
    with transaction.atomic():
        for saga_id, limit in ((kept, steps[0]["time_limit"]), (mine, 999)):
            _, rows = read.read_locked(saga_id, wait=None)
            assert rows[0].definition["time_limit"] == limit
