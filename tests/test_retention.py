"""Retention: `sagas_purge` and the `sagas.purge` beat task delete finished sagas, with their
steps and events, in batches; never a saga in flight or failed, nor any other row."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command, load_command_class
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from sagas import conf, tasks
from sagas.durations import parse_duration
from sagas.models import Saga, SagaEvent, SagaMember, SagaNotice, SagaStep
from sagas.retention import parse_statuses, purge
from tests.conftest import database_url
from tests.factories import OrderFactory

OLD, RECENT = "40 days", "1 day"


def insert_select(model: Any, source: str, values: dict[str, str]) -> None:
    """INSERT INTO the model's table SELECT ... FROM `source`: `values` gives SQL for some
    columns, every other one gets its field's default (so a column added later still fits)."""
    fields = [f for f in model._meta.concrete_fields if not f.auto_created]
    expressions, params = [], []
    for f in fields:
        if f.attname in values:
            expressions.append(values[f.attname])
        else:
            expressions.append(f"%s::{f.db_type(connection)}")
            params.append(f.get_db_prep_save(f.get_default(), connection))
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    table = connection.ops.quote_name(model._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} ({columns}) SELECT {', '.join(expressions)} FROM {source}",
            params,
        )


def add_sagas(name: str, count: int, status: str, finished: str | None, age: str = OLD) -> None:
    """`count` sagas called `name`, each with two steps and two events, in three statements.
    `status` is SQL of `i` (1..count); `finished` how long ago they finished (None: never)."""
    finished_at = f"now() - interval '{finished}' - i * interval '1 s'" if finished else "NULL"
    insert_select(
        Saga,
        f"generate_series(1, {count}) AS i",
        {
            "id": "gen_random_uuid()",
            "name": f"'{name}'",
            "status": status,
            "input": """jsonb_build_object('n', i)""",
            "created_at": f"now() - interval '{age}' - interval '1 hour'",
            "updated_at": "now()",
            "finished_at": finished_at,
        },
    )
    source = f"sagas_saga s CROSS JOIN generate_series(0, 1) AS k WHERE s.name = '{name}'"
    insert_select(
        SagaStep,
        source,
        {
            "saga_id": "s.id",
            "index": "k",
            "name": "'step_' || k",
            "status": "'completed'",
            "stored_definition": """'{"action": "tests.sagadefs.record"}'::jsonb""",
        },
    )
    insert_select(
        SagaEvent,
        source,
        {"saga_id": "s.id", "kind": "'saga_started'", "created_at": "s.created_at"},
    )


def rows_of(names: list[str]) -> tuple[int, int, int]:
    return (
        Saga.objects.filter(name__in=names).count(),
        SagaStep.objects.filter(saga__name__in=names).count(),
        SagaEvent.objects.filter(saga__name__in=names).count(),
    )


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_ages_and_statuses_are_read_with_clear_errors():
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("12h") == timedelta(hours=12)
    assert parse_duration(" 90M ") == timedelta(minutes=90)
    assert parse_duration("2w") == parse_duration("14d")
    for text, problem in [
        ("30", "'30' has no unit"),
        ("30x", "unknown unit 'x'"),
        ("1.5d", "is not a duration"),
        ("-3d", "is not a duration"),
        ("", "a duration is needed"),
        ("0d", "must be more than 0"),
        ("99999999999d", "more than 100 years"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_duration(text)

    assert parse_statuses("completed") == ("completed",)
    assert parse_statuses(" Compensated,completed,compensated") == ("compensated", "completed")
    for text, problem in [
        ("failed", "failed sagas wait for an operator"),
        ("completed,running", "running sagas are in flight"),
        ("done", "unknown status 'done': choose from completed, compensated"),
        (",", "no status given"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_statuses(text)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        (["--older-than", "30"], "'30' has no unit"),
        (["--older-than", "soon"], "'soon' is not a duration"),
        (["--older-than", "30d", "--status", "failed"], "failed sagas wait for an operator"),
        (["--older-than", "30d", "--batch-size", "0"], "--batch-size must be from 1 to 10000"),
        (["--older-than", "30d", "--batch-size", "many"], "invalid int value: 'many'"),
        ([], "the following arguments are required: --older-than"),
    ],
)
def test_the_command_refuses_bad_input_with_a_non_zero_exit(capsys, arguments, problem):
    command = load_command_class("sagas", "sagas_purge")
    with pytest.raises(SystemExit) as exit:
        command.run_from_argv(["manage.py", "sagas_purge", *arguments])
    assert exit.value.code != 0
    assert problem in capsys.readouterr().err


@pytest.mark.django_db(transaction=True)  # a transaction per batch, as in production
def test_the_purge_deletes_old_finished_sagas_in_batches_and_nothing_else():
    # 10,000 to purge: 5,000 completed and 5,000 compensated, finished 40 days ago.
    status = "CASE WHEN mod(i, 2) = 0 THEN 'completed' ELSE 'compensated' END"
    add_sagas("old_finished", 10_000, status, OLD)
    # To keep: finished recently; failed (waiting for an operator); in flight, all as old.
    add_sagas("recent_finished", 4, status, RECENT)
    add_sagas("old_failed", 3, "'failed'", None)
    add_sagas("old_in_flight", 3, "(ARRAY['pending', 'running', 'compensating'])[i]", None)
    kept = ["recent_finished", "old_failed", "old_in_flight"]
    assert rows_of(kept) == (10, 20, 20)
    order = OrderFactory(saga=Saga.objects.filter(name="old_finished").first())

    out = io.StringIO()
    call_command("sagas_purge", "--older-than", "30d", "--dry-run", stdout=out, stderr=Terminal())
    assert out.getvalue().startswith(
        "Dry run: 10,000 saga(s) (5,000 completed, 5,000 compensated) that finished before "
    )
    assert rows_of(["old_finished"]) == (10_000, 20_000, 20_000)

    # Another process holds one of them (a late duplicate message of its saga, say): skipped.
    held = Saga.objects.filter(name="old_finished", status="completed").first()
    with psycopg.connect(database_url(connection.settings_dict)) as other:
        other.execute("SELECT 1 FROM sagas_saga WHERE id = %s FOR UPDATE", [held.pk])
        out, terminal = io.StringIO(), Terminal()
        with CaptureQueriesContext(connection) as queries:
            call_command(
                "sagas_purge", "--older-than", "30d", "--batch-size", "1000",
                stdout=out, stderr=terminal,
            )  # fmt: skip

    # Ten batches, each claiming at most 1,000 sagas, then deleting their steps, group members
    # and events by saga id, then the sagas (Django's collector sends those 100 at a time).
    batches: list[list[tuple[str, int]]] = []
    for query in queries:
        sql = query["sql"]
        if sql.startswith("SELECT") and sql.endswith("FOR UPDATE SKIP LOCKED"):
            batches.append([])
        elif sql.startswith("DELETE FROM") and "sagas_operatorrequest" not in sql:
            batches[-1].append((sql.split('"')[1], sql.count("'::uuid")))  # (keys: after all)
    deleting = [batch for batch in batches if batch]
    assert len(batches) == 12 and len(deleting) == 10  # and one empty claim per status
    for batch in deleting:
        tables = [table for table, _ in batch]
        assert tables[0] == "sagas_sagastep", tables
        assert "sagas_sagaevent" in tables[1:3], tables
        assert set(tables[1:]) <= {
            "sagas_sagaevent",
            "sagas_sagamember",
            "sagas_saga",
            "sagas_saganotice",
            "sagas_sagasignal",
            "sagas_testing_fault",
        }, tables
        assert tables[-1] == "sagas_saga"
        assert all(ids <= 1000 for _, ids in batch)
        assert sum(ids for table, ids in batch if table == "sagas_saga") in (999, 1000)
    assert out.getvalue().startswith(
        "Purged 9,999 saga(s) (4,999 completed, 5,000 compensated) that finished before "
    )
    assert "with 19,998 step(s) and 19,998 event(s), in 10 batch(es)" in out.getvalue()
    progress = terminal.getvalue()  # (the held saga is counted, not deleted)
    assert progress.count("\r") == 10 and "9,999 of 10,000 sagas, 10 batch(es)" in progress

    # A batch is claimed by the index, not by a scan of the table.
    claim = next(q["sql"] for q in queries if q["sql"].endswith("FOR UPDATE SKIP LOCKED"))
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")  # the table is small by now
        cursor.execute(f"EXPLAIN {claim}")
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert "saga_status_finished_idx" in plan and "Index Cond" in plan, plan

    assert rows_of(["old_finished"]) == (1, 2, 2)  # the one held
    assert rows_of(kept) == (10, 20, 20)  # every other row, steps and events included
    order.refresh_from_db()
    assert order.saga is None  # an order outlives its saga

    # Released, it goes at the next run; logs get their line without a progress bar.
    out, piped = io.StringIO(), io.StringIO()
    call_command("sagas_purge", "--older-than", "30d", "--status", "completed", stdout=out,
                 stderr=piped)  # fmt: skip
    assert out.getvalue().startswith("Purged 1 saga(s) (1 completed) that finished before ")
    assert piped.getvalue() == ""
    assert rows_of(["old_finished"]) == (0, 0, 0)
    # Nothing of theirs is left behind: steps, events, members and notices have no foreign-key
    # constraint (their inserts are spared its check), and the purge's cascade deletes them.
    sagas = Saga.objects.values("pk")
    for model in (SagaStep, SagaEvent, SagaMember, SagaNotice):
        assert not model.objects.exclude(saga_id__in=sagas).exists(), model


def test_the_beat_task_purges_only_when_retention_is_set(db, settings):
    add_sagas("old_finished", 3, "'completed'", OLD)
    add_sagas("recent_finished", 2, "'compensated'", RECENT)

    settings.SAGAS_RETENTION = None  # off (the default: tests/test_conf.py)
    with CaptureQueriesContext(connection) as queries:
        assert tasks.purge() == {"purged": 0}
    assert len(queries) == 0

    settings.SAGAS_RETENTION = "30d"
    assert tasks.purge() == {"purged": 3}
    assert rows_of(["old_finished", "recent_finished"]) == (2, 4, 4)

    settings.SAGAS_RETENTION = 3600
    assert conf.retention() == timedelta(hours=1)
    assert tasks.purge() == {"purged": 2}

    assert purge(older_than=timedelta(hours=1), max_batches=0).finished is False
    settings.SAGAS_RETENTION = "30"
    with pytest.raises(ImproperlyConfigured, match="SAGAS_RETENTION = '30': '30' has no unit"):
        conf.retention()


@pytest.mark.django_db
def test_the_purge_deletes_operator_request_keys_of_the_sagas_age():
    from django.utils import timezone

    from sagas.models import OperatorRequest
    from tests.factories import UserFactory

    user = UserFactory()
    old = OperatorRequest.objects.create(
        user=user, key="k-old", path="/a", created_at=timezone.now() - timedelta(days=40)
    )
    recent = OperatorRequest.objects.create(user=user, key="k-new", path="/a")
    assert purge(older_than=timedelta(days=30), dry_run=True).rows == {}  # counts sagas only
    report = purge(older_than=timedelta(days=30))
    assert report.rows[OperatorRequest._meta.label] == 1
    assert list(OperatorRequest.objects.values_list("pk", flat=True)) == [recent.pk]
    assert not OperatorRequest.objects.filter(pk=old.pk).exists()
