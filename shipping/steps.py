"""The shipping steps: schedule the shipment, or cancel it (the order fulfilment saga's step,
or the shipment saga's first: `shipping.sagas`), and print its label."""

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


def book_carrier(ctx: StepContext) -> dict[str, int | str]:
    """The shipment saga's first step: the same booking, under the shipment saga's name."""
    return schedule_shipment(ctx)


def print_label(ctx: StepContext) -> dict[str, str]:
    """The shipment's label: a document of the booking's tracking number."""
    tracking = ctx.outputs["book_carrier"]["tracking_number"]
    return {"label": f"labels/{tracking}.pdf"}
