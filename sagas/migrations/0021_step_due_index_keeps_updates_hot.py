# The waits' due index without `status` in its predicate: a column an index's predicate reads
# blocks HOT updates as an indexed column does (whatever the values), and every step's write
# changes its status, so since `0015` no step row's update was HOT. `due_at` is set only while
# a wait waits (its end clears it), so the index stays as small.
#
# Built and dropped CONCURRENTLY, which takes no lock that stops writes and cannot run in a
# transaction. Hence not atomic.

from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0020_child_sagas"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="sagastep",
            index=models.Index(
                condition=models.Q(("due_at__isnull", False)),
                fields=["due_at"],
                name="saga_step_due_at_idx",
            ),
        ),
        RemoveIndexConcurrently(model_name="sagastep", name="saga_step_due_idx"),
    ]
