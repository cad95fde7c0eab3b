# The sweeper's index of deadlines: the sagas it may compensate that have one (a few). Before
# it, the sweep read every saga in flight or waiting: 30 ms for 100,000 waiting sagas.
#
# For tables of millions of sagas it is built CONCURRENTLY, which takes no lock that stops
# writes and cannot run in a transaction. Hence not atomic.

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0016_approvals"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="saga",
            index=models.Index(
                condition=models.Q(
                    ("deadline_at__isnull", False),
                    ("status__in", ["pending", "running", "waiting"]),
                ),
                fields=["deadline_at"],
                name="saga_deadline_idx",
            ),
        ),
    ]
