"""The index of `0002` goes: an order's saga is found by its key (`business_key`, which every
order fulfilment saga has since `0003`), through the framework's `saga_business_key_idx`. The
two indexed the same value, and each saga's insert and status change paid for both.
"""

from django.db import migrations


class Migration(migrations.Migration):
    atomic = False  # concurrently: no lock that stops the sagas' writes

    dependencies = [
        ("orders", "0003_saga_business_key"),
    ]

    operations = [
        migrations.RunSQL(
            sql="DROP INDEX CONCURRENTLY IF EXISTS orders_saga_order_id_idx",
            reverse_sql=(
                "CREATE INDEX CONCURRENTLY orders_saga_order_id_idx ON sagas_saga "
                "((input -> 'order_id')) WHERE name = 'order_fulfilment'"
            ),
        ),
    ]
