# Waits: a saga and a stage may be `waiting`, a wait's due time (`due_at`, with a partial index
# of the waiting ones), and the signals sent to sagas (`SagaSignal`).
#
# For tables of millions of sagas, steps and events, nothing here holds a lock while it scans:
# the widened check constraints are added NOT VALID and validated after (which takes no lock
# that stops writes); the indexes are built and dropped CONCURRENTLY; the unique index of one
# saga in flight per key is built anew beside the old one and takes its name, so that it is
# never missing. Hence not atomic.

import django.db.models.deletion
import django.utils.timezone
from django.conf import settings
from django.contrib.postgres.operations import (
    AddConstraintNotValid,
    AddIndexConcurrently,
    RemoveIndexConcurrently,
    ValidateConstraint,
)
from django.db import migrations, models

ONE_IN_FLIGHT_NEW = (
    'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "saga_one_in_flight_per_key_new" '
    'ON "sagas_saga" ("name", "business_key") '
    "WHERE ((\"options\" -> 'one_in_flight_per_key') = 'true'::jsonb "
    "AND \"status\" IN ('pending', 'running', 'waiting', 'compensating', 'failed'))"
)
ONE_IN_FLIGHT_OLD = (
    'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "saga_one_in_flight_per_key" '
    'ON "sagas_saga" ("name", "business_key") '
    "WHERE ((\"options\" -> 'one_in_flight_per_key') = 'true'::jsonb "
    "AND \"status\" IN ('pending', 'running', 'compensating', 'failed'))"
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0014_saga_notice"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.CreateModel(
            name="SagaSignal",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                (
                    "event",
                    models.CharField(
                        help_text="The event's name, as its wait names it.", max_length=100
                    ),
                ),
                (
                    "payload",
                    models.JSONField(blank=True, help_text="What the event carries.", null=True),
                ),
                (
                    "fail",
                    models.JSONField(
                        blank=True,
                        help_text="The error of a signal that fails its wait.",
                        null=True,
                    ),
                ),
                ("idempotency_key", models.CharField(blank=True, max_length=200, null=True)),
                (
                    "status",
                    models.CharField(
                        choices=[
                            ("kept", "Kept for a wait to come"),
                            ("consumed", "Consumed by its wait"),
                            ("refused", "Refused"),
                            ("discarded", "Discarded (no wait consumed it)"),
                        ],
                        max_length=20,
                    ),
                ),
                (
                    "stage",
                    models.PositiveSmallIntegerField(
                        blank=True, help_text="The wait that consumed it.", null=True
                    ),
                ),
                (
                    "reason",
                    models.CharField(blank=True, help_text="Why it was refused.", max_length=300),
                ),
                ("created_at", models.DateTimeField(default=django.utils.timezone.now)),
            ],
            options={
                "verbose_name": "saga signal",
            },
        ),
        migrations.AlterModelOptions(
            name="saga",
            options={
                "ordering": ("-created_at",),
                "permissions": [
                    ("retry_saga", "Can retry a failed saga"),
                    ("compensate_saga", "Can compensate (abort) a saga"),
                    ("resolve_saga", "Can resolve a step whose compensation failed"),
                    ("signal_saga", "Can send a signal to a saga"),
                ],
                "verbose_name": "saga",
                "verbose_name_plural": "sagas",
            },
        ),
        migrations.AddField(
            model_name="sagastep",
            name="due_at",
            field=models.DateTimeField(
                blank=True,
                help_text="A wait's timeout: when it ends if no signal came (set while it waits).",
                null=True,
            ),
        ),
        migrations.AlterField(
            model_name="saga",
            name="status",
            field=models.CharField(
                choices=[
                    ("pending", "Pending"),
                    ("running", "Running"),
                    ("waiting", "Waiting"),
                    ("compensating", "Compensating"),
                    ("completed", "Completed"),
                    ("compensated", "Compensated"),
                    ("failed", "Failed"),
                ],
                default="pending",
                help_text="Where the saga is in its life cycle.",
                max_length=20,
            ),
        ),
        migrations.AlterField(
            model_name="sagaevent",
            name="kind",
            field=models.CharField(
                choices=[
                    ("saga_started", "Saga started"),
                    ("step_completed", "Step completed"),
                    ("step_retrying", "Step attempt failed, retrying"),
                    ("step_failed", "Step failed"),
                    ("saga_paused", "Saga paused for an operator"),
                    ("compensation_started", "Compensation started"),
                    ("step_compensated", "Step compensated"),
                    ("compensation_retrying", "Compensation attempt failed, retrying"),
                    ("compensation_failed", "Compensation failed"),
                    ("saga_completed", "Saga completed"),
                    ("saga_compensated", "Saga compensated"),
                    ("saga_failed", "Saga failed"),
                    ("operator_retry", "Operator retried"),
                    ("operator_compensate", "Operator aborted (compensate)"),
                    ("operator_resolve", "Operator resolved a step by hand"),
                    ("duplicate_ignored", "Duplicate delivery ignored"),
                    ("recovered", "Recovered by the sweeper"),
                    ("deadline_passed", "Deadline passed"),
                    ("wait_started", "Wait started"),
                    ("wait_completed", "Wait completed"),
                    ("wait_failed", "Wait failed"),
                    ("wait_timed_out", "Wait timed out"),
                    ("signal_kept", "Signal kept for a wait to come"),
                    ("signal_refused", "Signal refused"),
                    ("signal_discarded", "Kept signal discarded"),
                ],
                help_text="What happened.",
                max_length=40,
            ),
        ),
        migrations.AlterField(
            model_name="sagastep",
            name="status",
            field=models.CharField(
                choices=[
                    ("pending", "Pending"),
                    ("running", "Running (retrying)"),
                    ("waiting", "Waiting"),
                    ("completed", "Completed"),
                    ("failed", "Failed"),
                    ("compensating", "To compensate"),
                    ("compensated", "Compensated"),
                    ("compensation_failed", "Compensation failed"),
                ],
                default="pending",
                help_text="Where the step is in its life cycle.",
                max_length=20,
            ),
        ),
        migrations.RemoveConstraint(model_name="saga", name="saga_status_valid"),
        AddConstraintNotValid(
            model_name="saga",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    (
                        "status__in",
                        [
                            "pending",
                            "running",
                            "waiting",
                            "compensating",
                            "completed",
                            "compensated",
                            "failed",
                        ],
                    )
                ),
                name="saga_status_valid",
            ),
        ),
        ValidateConstraint(model_name="saga", name="saga_status_valid"),
        migrations.RemoveConstraint(model_name="sagaevent", name="saga_event_kind_valid"),
        AddConstraintNotValid(
            model_name="sagaevent",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    (
                        "kind__in",
                        [
                            "saga_started",
                            "step_completed",
                            "step_retrying",
                            "step_failed",
                            "saga_paused",
                            "compensation_started",
                            "step_compensated",
                            "compensation_retrying",
                            "compensation_failed",
                            "saga_completed",
                            "saga_compensated",
                            "saga_failed",
                            "operator_retry",
                            "operator_compensate",
                            "operator_resolve",
                            "duplicate_ignored",
                            "recovered",
                            "deadline_passed",
                            "wait_started",
                            "wait_completed",
                            "wait_failed",
                            "wait_timed_out",
                            "signal_kept",
                            "signal_refused",
                            "signal_discarded",
                        ],
                    )
                ),
                name="saga_event_kind_valid",
            ),
        ),
        ValidateConstraint(model_name="sagaevent", name="saga_event_kind_valid"),
        migrations.RemoveConstraint(model_name="sagastep", name="saga_step_status_valid"),
        AddConstraintNotValid(
            model_name="sagastep",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    (
                        "status__in",
                        [
                            "pending",
                            "running",
                            "waiting",
                            "completed",
                            "failed",
                            "compensating",
                            "compensated",
                            "compensation_failed",
                        ],
                    )
                ),
                name="saga_step_status_valid",
            ),
        ),
        ValidateConstraint(model_name="sagastep", name="saga_step_status_valid"),
        RemoveIndexConcurrently(model_name="saga", name="saga_in_flight_idx"),
        AddIndexConcurrently(
            model_name="saga",
            index=models.Index(
                condition=models.Q(
                    ("status__in", ["pending", "running", "compensating", "waiting"])
                ),
                fields=["status"],
                name="saga_in_flight_idx",
            ),
        ),
        AddIndexConcurrently(
            model_name="sagastep",
            index=models.Index(
                condition=models.Q(("status", "waiting")),
                fields=["due_at"],
                name="saga_step_due_idx",
            ),
        ),
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    ONE_IN_FLIGHT_NEW,
                    reverse_sql="DROP INDEX CONCURRENTLY IF EXISTS "
                    '"saga_one_in_flight_per_key_new"',
                ),
                migrations.RunSQL(
                    'DROP INDEX CONCURRENTLY IF EXISTS "saga_one_in_flight_per_key"',
                    reverse_sql=ONE_IN_FLIGHT_OLD,
                ),
                migrations.RunSQL(
                    'ALTER INDEX "saga_one_in_flight_per_key_new" '
                    'RENAME TO "saga_one_in_flight_per_key"',
                    reverse_sql='ALTER INDEX "saga_one_in_flight_per_key" '
                    'RENAME TO "saga_one_in_flight_per_key_new"',
                ),
            ],
            state_operations=[
                migrations.RemoveConstraint(model_name="saga", name="saga_one_in_flight_per_key"),
                migrations.AddConstraint(
                    model_name="saga",
                    constraint=models.UniqueConstraint(
                        condition=models.Q(
                            ("options__one_in_flight_per_key", True),
                            (
                                "status__in",
                                ["pending", "running", "waiting", "compensating", "failed"],
                            ),
                        ),
                        fields=("name", "business_key"),
                        name="saga_one_in_flight_per_key",
                    ),
                ),
            ],
        ),
        migrations.AddField(
            model_name="sagasignal",
            name="saga",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE, related_name="signals", to="sagas.saga"
            ),
        ),
        migrations.AddIndex(
            model_name="sagasignal",
            index=models.Index(
                condition=models.Q(("status", "kept")),
                fields=["saga", "event"],
                name="saga_signal_kept_idx",
            ),
        ),
        migrations.AddConstraint(
            model_name="sagasignal",
            constraint=models.CheckConstraint(
                condition=models.Q(("status__in", ["kept", "consumed", "refused", "discarded"])),
                name="saga_signal_status_valid",
            ),
        ),
        migrations.AddConstraint(
            model_name="sagasignal",
            constraint=models.UniqueConstraint(
                condition=models.Q(("idempotency_key__isnull", False)),
                fields=("saga", "idempotency_key"),
                name="saga_signal_once",
            ),
        ),
    ]
