# Rows that are cheap to write (`docs/performance.md`, "What a step costs PostgreSQL"):
#
# - no foreign-key constraint on the rows the engine writes with their saga or under its row
#   lock (steps, events, notices, group members): each insert's check was a statement of its
#   own; Django's cascade still deletes them with their saga;
# - the index of a user's sagas partial (built concurrently, then the full one dropped): most
#   sagas are started by no user, and the full index held a NULL for each;
# - room in each page for a row's next versions (`fillfactor`: 70 for steps, 80 for sagas), so
#   that their updates stay HOT (no index touched): for the pages written from now on.
#
# Not in a transaction (the concurrent index), hence not atomic.

import django.db.models.deletion
from django.conf import settings
from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models

STORAGE = (
    "ALTER TABLE sagas_sagastep SET (fillfactor = 70); "
    "ALTER TABLE sagas_saga SET (fillfactor = 80)"
)
DEFAULT_STORAGE = (
    "ALTER TABLE sagas_sagastep RESET (fillfactor); "
    "ALTER TABLE sagas_saga RESET (fillfactor)"
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("sagas", "0024_reconciliation_validated"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="saga",
            index=models.Index(
                condition=models.Q(("created_by__isnull", False)),
                fields=["created_by"],
                name="saga_created_by_idx",
            ),
        ),
        migrations.AlterField(
            model_name="saga",
            name="created_by",
            field=models.ForeignKey(
                blank=True,
                db_index=False,
                help_text="The user on whose behalf the saga was started, if any.",
                null=True,
                on_delete=django.db.models.deletion.SET_NULL,
                related_name="+",
                to=settings.AUTH_USER_MODEL,
            ),
        ),
        migrations.AlterField(
            model_name="sagaevent",
            name="saga",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="events",
                to="sagas.saga",
            ),
        ),
        migrations.AlterField(
            model_name="sagamember",
            name="saga",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="members",
                to="sagas.saga",
            ),
        ),
        migrations.AlterField(
            model_name="saganotice",
            name="saga",
            field=models.ForeignKey(
                db_constraint=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="+",
                to="sagas.saga",
            ),
        ),
        migrations.AlterField(
            model_name="sagastep",
            name="saga",
            field=models.ForeignKey(
                db_constraint=False,
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="steps",
                to="sagas.saga",
            ),
        ),
        migrations.RunSQL(STORAGE, DEFAULT_STORAGE),
    ]
