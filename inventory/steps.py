"""The inventory steps of the order fulfilment saga: reserve stock, or release it, for the
whole order, or for one line (a member of the group that reserves each line at once:
`ORDERS_RESERVE_EACH_LINE`)."""

from __future__ import annotations

from typing import Any

from inventory.services import inventory_release, inventory_reserve
from sagas.definitions import StepContext


def reserve_inventory(ctx: StepContext) -> dict[str, list[int]]:
    reservations = inventory_reserve(order_id=ctx.input["order_id"], lines=ctx.input["items"])
    return {"reservation_ids": [reservation.pk for reservation in reservations]}


def release_inventory(ctx: StepContext) -> None:
    inventory_release(order_id=ctx.input["order_id"])


def order_lines(ctx: StepContext) -> list[dict[str, Any]]:
    """The items the group maps over: the order's lines (one SKU each)."""
    return list(ctx.input["items"])


def line_sku(line: dict[str, Any]) -> str:
    """A line's key in the group (its members' names): its SKU."""
    return str(line["sku"])


def reserve_line(ctx: StepContext) -> dict[str, list[int]]:
    reservations = inventory_reserve(order_id=ctx.input["order_id"], lines=[ctx.item])
    return {"reservation_ids": [reservation.pk for reservation in reservations]}


def release_line(ctx: StepContext) -> None:
    inventory_release(order_id=ctx.input["order_id"], skus=[ctx.item["sku"]])
