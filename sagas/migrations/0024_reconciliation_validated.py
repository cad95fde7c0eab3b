# Validate the check constraints `0023` added NOT VALID (a scan that lets writes go on), and
# build the index of the flagged sagas concurrently (no lock that stops writes; not in a
# transaction, hence not atomic).

from django.contrib.postgres.operations import AddIndexConcurrently, ValidateConstraint
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0023_reconciliation"),
    ]

    operations = [
        ValidateConstraint(model_name="bulkaction", name="bulk_action_action_valid"),
        ValidateConstraint(model_name="sagaevent", name="saga_event_kind_valid"),
        AddIndexConcurrently(
            model_name="saga",
            index=models.Index(
                condition=models.Q(("reconciliation", "discrepant")),
                fields=["-finished_at"],
                name="saga_discrepant_idx",
            ),
        ),
    ]
