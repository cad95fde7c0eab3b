"""The order fulfilment sagas started before sagas had keys get theirs: the order id.

The saga's definition names its key (`key="order_id"`) and new sagas store it when they start;
this gives the older ones the same, so that the admin and `GET /api/sagas/?key=` find them.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [
        ("orders", "0002_saga_order_id_index"),
        ("sagas", "0007_saga_business_key"),
    ]

    operations = [
        migrations.RunSQL(
            sql=(
                "UPDATE sagas_saga SET business_key = input ->> 'order_id' "
                "WHERE name = 'order_fulfilment' AND business_key IS NULL "
                "AND input ->> 'order_id' IS NOT NULL"
            ),
            reverse_sql=migrations.RunSQL.noop,
        ),
    ]
