"""The index that retention (sagas_purge, the sagas.purge task) finds finished sagas by.

Built CONCURRENTLY, so that a large table takes writes meanwhile: the migration is not atomic.
"""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0007_saga_business_key"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="saga",
            index=models.Index(condition=models.Q(("finished_at__isnull", False)), fields=["status", "finished_at"], name="saga_status_finished_idx"),
        ),
    ]
