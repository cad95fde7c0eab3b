"""The inventory step of the order fulfilment saga: reserve stock, or release it."""

from __future__ import annotations

from inventory.services import inventory_release, inventory_reserve
from sagas.definitions import StepContext


def reserve_inventory(ctx: StepContext) -> dict[str, list[int]]:
    reservations = inventory_reserve(order_id=ctx.input["order_id"], lines=ctx.input["items"])
    return {"reservation_ids": [reservation.pk for reservation in reservations]}


def release_inventory(ctx: StepContext) -> None:
    inventory_release(order_id=ctx.input["order_id"])
