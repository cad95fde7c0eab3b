"""The shipping step of the order fulfilment saga: schedule the shipment, or cancel it."""

from __future__ import annotations

from sagas.definitions import StepContext
from shipping.services import shipment_cancel, shipment_schedule


def schedule_shipment(ctx: StepContext) -> dict[str, int | str]:
    shipment = shipment_schedule(
        order_id=ctx.input["order_id"], address=ctx.input["shipping_address"]
    )
    return {"shipment_id": shipment.pk, "tracking_number": shipment.tracking_number}


def cancel_shipment(ctx: StepContext) -> None:
    shipment_cancel(order_id=ctx.input["order_id"])
