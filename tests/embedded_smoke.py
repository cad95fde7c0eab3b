"""Run one order saga on the embedded PostgreSQL and Redis (used by test_embedded.py).

Run with DATABASE_URL and CELERY_BROKER_URL unset: settings start the embedded servers and
export their URLs, so the worker started here shares them.
"""

from __future__ import annotations

import os
import sys
import time
from decimal import Decimal

import django

from sagas.testing.worker import CeleryWorker


def main() -> int:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sagaproject.settings")
    django.setup()
    from django.core.management import call_command

    from inventory.services import product_create
    from orders.services import order_submit
    from sagaproject import embedded
    from sagas.models import Saga

    print("database:", os.environ["DATABASE_URL"], "broker:", os.environ["CELERY_BROKER_URL"])
    call_command("migrate", verbosity=0, interactive=False)
    product = product_create(
        sku="EMBEDDED-1", name="Embedded", price=Decimal("5.00"), stock_on_hand=3
    )
    queue = os.environ["CELERY_TASK_DEFAULT_QUEUE"]
    worker = CeleryWorker(
        "sagaproject", queue=queue, nodes=["celery"], loglevel="warning", stop_timeout=30
    )
    try:
        worker.start()
        saga, _ = order_submit(
            customer=None,
            items=[{"sku": product.sku, "quantity": 1}],
            shipping_address={
                "name": "A",
                "line1": "1 Road",
                "city": "Oslo",
                "postal_code": "0150",
                "country": "NO",
            },
            payment_token="tok_ok",
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            status = Saga.objects.get(pk=saga.pk).status
            if status in ("completed", "compensated", "failed"):
                break
            time.sleep(0.1)
        print("saga status:", status)
        return 0 if status == "completed" else 1
    finally:
        worker.stop()
        embedded.stop_redis_if_started()
        embedded.stop_postgres()


if __name__ == "__main__":
    sys.exit(main())
