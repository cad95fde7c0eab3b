# Bulk skip: a bulk action may mark the stage of one name as done in every saga it takes, with one
# output (`skip`); the stage, the output and the note are the bulk action's, NULL for the other
# actions (new nullable columns: no table rewrite).
#
# The widened check constraint of the action, and the new one that a skip (and only a skip)
# names its stage, are added NOT VALID and validated after, which takes no lock that stops
# writes, as 0015 and 0016 do. Hence not atomic.

from django.contrib.postgres.operations import AddConstraintNotValid, ValidateConstraint
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("sagas", "0017_saga_deadline_idx")]

    operations = [
        migrations.AddField(
            model_name="bulkaction",
            name="stage",
            field=models.CharField(
                blank=True,
                help_text="A skip's: the name of the stage marked as done in each saga.",
                max_length=100,
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="bulkaction",
            name="output",
            field=models.JSONField(
                blank=True,
                help_text="A skip's: the output each saga's stage is given (the same for every "
                "saga).",
                null=True,
            ),
        ),
        migrations.AddField(
            model_name="bulkaction",
            name="note",
            field=models.CharField(
                blank=True,
                help_text="A skip's: why, on each saga's timeline.",
                max_length=1000,
                null=True,
            ),
        ),
        migrations.AlterField(
            model_name="bulkaction",
            name="action",
            field=models.CharField(
                choices=[("retry", "Retry"), ("compensate", "Compensate"), ("skip", "Skip")],
                help_text="The action taken on each saga.",
                max_length=20,
            ),
        ),
        migrations.RemoveConstraint(model_name="bulkaction", name="bulk_action_action_valid"),
        AddConstraintNotValid(
            model_name="bulkaction",
            constraint=models.CheckConstraint(
                condition=models.Q(("action__in", ["retry", "compensate", "skip"])),
                name="bulk_action_action_valid",
            ),
        ),
        ValidateConstraint(model_name="bulkaction", name="bulk_action_action_valid"),
        AddConstraintNotValid(
            model_name="bulkaction",
            constraint=models.CheckConstraint(
                condition=models.Q(
                    models.Q(("action", "skip"), ("stage__isnull", False)),
                    models.Q(models.Q(("action", "skip"), _negated=True), ("stage__isnull", True)),
                    _connector="OR",
                ),
                name="bulk_action_skip_stage",
            ),
        ),
        ValidateConstraint(model_name="bulkaction", name="bulk_action_skip_stage"),
    ]
