# Reconciliation (`sagas.engine.reconcile`): what the last check of a final saga found, and the
# event kinds and operator actions it brings. The columns are added without rewriting the table
# (a constant default); the check constraints that name the new values are added NOT VALID
# (no scan of the event log under its lock) and validated by `0024`, which also builds the
# flagged sagas' index concurrently.

from django.conf import settings
from django.contrib.postgres.operations import AddConstraintNotValid
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('sagas', '0022_child_members'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AlterModelOptions(
            name='saga',
            options={'ordering': ('-created_at',), 'permissions': [('retry_saga', 'Can retry a failed saga'), ('compensate_saga', 'Can compensate (abort) a saga'), ('resolve_saga', 'Can resolve a step whose compensation failed'), ('signal_saga', 'Can send a signal to a saga'), ('approve_saga', "Can approve or reject a saga's approval"), ('skip_saga', 'Can mark a failed or waiting stage as done by hand'), ('reconcile_saga', "Can run a final saga's reconciliation check"), ('repair_saga', 'Can run a repair a reconciliation check offers')], 'verbose_name': 'saga', 'verbose_name_plural': 'sagas'},
        ),
        migrations.RemoveConstraint(
            model_name='bulkaction',
            name='bulk_action_action_valid',
        ),
        migrations.RemoveConstraint(
            model_name='sagaevent',
            name='saga_event_kind_valid',
        ),
        migrations.AddField(
            model_name='saga',
            name='discrepancies',
            field=models.JSONField(blank=True, help_text='The discrepancies the last check found (code, message, repair), if any.', null=True),
        ),
        migrations.AddField(
            model_name='saga',
            name='reconciled_at',
            field=models.DateTimeField(blank=True, help_text='When the reconciliation check last ran on the saga.', null=True),
        ),
        migrations.AddField(
            model_name='saga',
            name='reconciliation',
            field=models.CharField(choices=[('unchecked', 'Not checked'), ('agrees', 'Agrees with the world'), ('discrepant', 'Discrepancies found')], default='unchecked', help_text='What the last reconciliation check found: discrepant sagas are flagged.', max_length=20),
        ),
        migrations.AlterField(
            model_name='bulkaction',
            name='action',
            field=models.CharField(choices=[('retry', 'Retry'), ('compensate', 'Compensate'), ('skip', 'Skip'), ('reconcile', 'Reconcile')], help_text='The action taken on each saga.', max_length=20),
        ),
        migrations.AlterField(
            model_name='sagaevent',
            name='kind',
            field=models.CharField(choices=[('saga_started', 'Saga started'), ('step_completed', 'Step completed'), ('step_retrying', 'Step attempt failed, retrying'), ('step_failed', 'Step failed'), ('saga_paused', 'Saga paused for an operator'), ('compensation_started', 'Compensation started'), ('step_compensated', 'Step compensated'), ('compensation_retrying', 'Compensation attempt failed, retrying'), ('compensation_failed', 'Compensation failed'), ('saga_completed', 'Saga completed'), ('saga_compensated', 'Saga compensated'), ('saga_failed', 'Saga failed'), ('operator_retry', 'Operator retried'), ('operator_compensate', 'Operator aborted (compensate)'), ('operator_resolve', 'Operator resolved a step by hand'), ('operator_skip', 'Operator marked a stage as done by hand'), ('duplicate_ignored', 'Duplicate delivery ignored'), ('recovered', 'Recovered by the sweeper'), ('deadline_passed', 'Deadline passed'), ('wait_started', 'Wait started'), ('wait_completed', 'Wait completed'), ('wait_failed', 'Wait failed'), ('wait_timed_out', 'Wait timed out'), ('wait_skipped', 'Wait skipped (its condition was false)'), ('signal_kept', 'Signal kept for a wait to come'), ('signal_refused', 'Signal refused'), ('signal_discarded', 'Kept signal discarded'), ('child_started', 'Child saga started'), ('discrepancy_found', 'Reconciliation found discrepancies'), ('discrepancy_cleared', 'Reconciliation agrees again'), ('reconcile_failed', 'Reconciliation check failed'), ('repair_requested', 'Operator repair requested'), ('repair_ran', 'Operator repair ran'), ('repair_failed', 'Operator repair failed')], help_text='What happened.', max_length=40),
        ),
        AddConstraintNotValid(
            model_name='bulkaction',
            constraint=models.CheckConstraint(condition=models.Q(('action__in', ['retry', 'compensate', 'skip', 'reconcile'])), name='bulk_action_action_valid'),
        ),
        AddConstraintNotValid(
            model_name='sagaevent',
            constraint=models.CheckConstraint(condition=models.Q(('kind__in', ['saga_started', 'step_completed', 'step_retrying', 'step_failed', 'saga_paused', 'compensation_started', 'step_compensated', 'compensation_retrying', 'compensation_failed', 'saga_completed', 'saga_compensated', 'saga_failed', 'operator_retry', 'operator_compensate', 'operator_resolve', 'operator_skip', 'duplicate_ignored', 'recovered', 'deadline_passed', 'wait_started', 'wait_completed', 'wait_failed', 'wait_timed_out', 'wait_skipped', 'signal_kept', 'signal_refused', 'signal_discarded', 'child_started', 'discrepancy_found', 'discrepancy_cleared', 'reconcile_failed', 'repair_requested', 'repair_ran', 'repair_failed'])), name='saga_event_kind_valid'),
        ),
    ]
