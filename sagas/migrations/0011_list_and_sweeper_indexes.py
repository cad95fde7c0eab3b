# Indexes for tables of millions of sagas: the sweeper's index holds the sagas in flight only,
# on `status` alone (a step's write that changes no indexed column can be a HOT update); the
# lists of a status have an index in their order; two indexes that repeated others go, as does
# the index on a step's status that nothing read. Built and dropped CONCURRENTLY (hence not
# atomic): a table in production keeps taking writes while they build.

import django.db.models.deletion
from django.contrib.postgres.operations import AddIndexConcurrently, RemoveIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):

    atomic = False

    dependencies = [
        ('sagas', '0010_bulk_actions'),
    ]

    operations = [
        AddIndexConcurrently(
            model_name='saga',
            index=models.Index(condition=models.Q(('status__in', ['pending', 'running', 'compensating'])), fields=['status'], name='saga_in_flight_idx'),
        ),
        AddIndexConcurrently(
            model_name='saga',
            index=models.Index(fields=['status', '-created_at'], name='saga_status_created_idx'),
        ),
        RemoveIndexConcurrently(
            model_name='saga',
            name='saga_status_updated_idx',
        ),
        RemoveIndexConcurrently(
            model_name='sagastep',
            name='saga_step_status_idx',
        ),
        migrations.AlterField(
            model_name='sagaevent',
            name='saga',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='events', to='sagas.saga'),
        ),
        migrations.AlterField(
            model_name='sagastep',
            name='saga',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE, related_name='steps', to='sagas.saga'),
        ),
    ]
