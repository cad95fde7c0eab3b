"""The shipment saga: book a carrier, print the label. The order fulfilment saga starts it as
its child (`ORDERS_SHIP_AS_CHILD`), and compensates it when the order is undone after it
shipped: the booking is cancelled."""

from __future__ import annotations

from django.conf import settings

from sagas.definitions import RetryPolicy, SagaDefinition, Step, register
from shipping.steps import book_carrier, cancel_shipment, print_label

SHIPMENT_SAGA = "shipment"
COMPENSATION_RETRY = RetryPolicy(max_attempts=6, backoff=0.25, backoff_max=4.0)
TIME_LIMIT = int(getattr(settings, "ORDERS_STEP_TIME_LIMIT", 60))

SHIPMENT = register(
    SagaDefinition(
        name=SHIPMENT_SAGA,
        steps=[
            Step(
                "book_carrier",
                book_carrier,
                cancel_shipment,
                compensation_retry=COMPENSATION_RETRY,
                time_limit=TIME_LIMIT,
            ),
            # Nothing to undo: a label of a cancelled booking is void.
            Step("print_label", print_label, time_limit=TIME_LIMIT),
        ],
        key="order_id",
    )
)
