"""An index for finding an order's saga before the order row exists.

`GET /api/orders/{id}/` falls back to the order fulfilment saga whose input names the order
(`input__order_id`): without this index that is a scan of every saga, for any id asked for.
Partial, on exactly the expression the ORM's lookup uses (`input -> 'order_id'`).
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0001_initial"),
        ("sagas", "0003_saga_deadline"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(
                "CREATE INDEX orders_saga_order_id_idx ON sagas_saga ((input -> 'order_id')) "
                "WHERE name = 'order_fulfilment'"
            ),
            reverse_sql="DROP INDEX orders_saga_order_id_idx",
        ),
    ]
