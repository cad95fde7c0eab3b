# Approvals, skipped waits and stages done by hand: the permissions to approve or reject
# (`approve_saga`) and to mark a stage as done (`skip_saga`), and their events: a wait skipped
# because its condition was false (`wait_skipped`), a stage an operator marked as done
# (`operator_skip`).
#
# The widened check constraint of the event log (a table of millions of rows) is added NOT
# VALID and validated after, which takes no lock that stops writes. Hence not atomic.

from django.contrib.postgres.operations import AddConstraintNotValid, ValidateConstraint
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("sagas", "0015_waits")]

    operations = [
        migrations.AlterModelOptions(
            name="saga",
            options={
                "ordering": ("-created_at",),
                "verbose_name": "saga",
                "verbose_name_plural": "sagas",
                "permissions": [
                    ("retry_saga", "Can retry a failed saga"),
                    ("compensate_saga", "Can compensate (abort) a saga"),
                    ("resolve_saga", "Can resolve a step whose compensation failed"),
                    ("signal_saga", "Can send a signal to a saga"),
                    ("approve_saga", "Can approve or reject a saga's approval"),
                    ("skip_saga", "Can mark a failed or waiting stage as done by hand"),
                ]
            },
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
                    ("operator_skip", "Operator marked a stage as done by hand"),
                    ("duplicate_ignored", "Duplicate delivery ignored"),
                    ("recovered", "Recovered by the sweeper"),
                    ("deadline_passed", "Deadline passed"),
                    ("wait_started", "Wait started"),
                    ("wait_completed", "Wait completed"),
                    ("wait_failed", "Wait failed"),
                    ("wait_timed_out", "Wait timed out"),
                    ("wait_skipped", "Wait skipped (its condition was false)"),
                    ("signal_kept", "Signal kept for a wait to come"),
                    ("signal_refused", "Signal refused"),
                    ("signal_discarded", "Kept signal discarded"),
                ],
                help_text="What happened.",
                max_length=40,
            ),
        ),
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
                            "operator_skip",
                            "duplicate_ignored",
                            "recovered",
                            "deadline_passed",
                            "wait_started",
                            "wait_completed",
                            "wait_failed",
                            "wait_timed_out",
                            "wait_skipped",
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
    ]
