"""The order fulfilment saga: create the order, charge it, reserve its stock, ship it."""

from __future__ import annotations

from django.conf import settings

from inventory.steps import release_inventory, reserve_inventory
from orders.services import ORDER_FULFILMENT_SAGA
from orders.steps import cancel_order, confirm_order, create_order
from payments.gateway import GatewayUnavailable
from payments.steps import charge_payment, refund_payment
from sagas.definitions import RetryPolicy, SagaDefinition, Step, register
from shipping.steps import cancel_shipment, schedule_shipment

# Compensations retry longer than steps (6 attempts against 4), with short waits: the
# reference saga's failures are brief. A real deployment tunes these to its systems.
COMPENSATION_RETRY = RetryPolicy(max_attempts=6, backoff=0.25, backoff_max=4.0)
# Seconds an attempt of any of its steps may take (the drill shortens it to kill hung steps).
TIME_LIMIT = int(getattr(settings, "ORDERS_STEP_TIME_LIMIT", 60))

ORDER_FULFILMENT = register(
    SagaDefinition(
        name=ORDER_FULFILMENT_SAGA,
        steps=[
            Step(
                "create_order",
                create_order,
                cancel_order,
                compensation_retry=COMPENSATION_RETRY,
                time_limit=TIME_LIMIT,
            ),
            Step(
                "charge_payment",
                charge_payment,
                refund_payment,
                retry=RetryPolicy(
                    max_attempts=4,
                    backoff=0.2,
                    backoff_max=2.0,
                    transient=(GatewayUnavailable,),
                ),
                compensation_retry=COMPENSATION_RETRY,
                # A gateway that stays down is an outage, not a reason to cancel the order:
                # an operator retries once it is back.
                on_exhausted="pause",
                # The gateway may have charged even though the step failed (a lost response):
                # compensating the failed step refunds such a charge.
                compensate_failed_step=True,
                time_limit=TIME_LIMIT,
            ),
            Step(
                "reserve_inventory",
                reserve_inventory,
                release_inventory,
                compensation_retry=COMPENSATION_RETRY,
                time_limit=TIME_LIMIT,
            ),
            Step(
                "schedule_shipment",
                schedule_shipment,
                cancel_shipment,
                compensation_retry=COMPENSATION_RETRY,
                time_limit=TIME_LIMIT,
            ),
        ],
        on_complete=confirm_order,
        # An order's sagas are found by its id (the admin, `GET /api/sagas/?key=`), and an
        # order is never fulfilled by two sagas at once.
        key="order_id",
        one_in_flight_per_key=True,
    )
)
