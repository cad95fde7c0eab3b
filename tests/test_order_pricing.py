"""Order pricing: `orders.services.order_price`, the one place an order's prices are computed."""

from __future__ import annotations

from decimal import Decimal

from orders.services import order_price


def test_a_line_costs_quantity_times_unit_price_and_the_order_their_sum():
    price = order_price(
        items=[
            {"sku": "MUG-CLASSIC", "quantity": 3, "unit_price": "12.50"},  # as in a saga's input
            {"sku": "TEE-BLUE", "quantity": 1, "unit_price": Decimal("19.90")},
        ]
    )
    assert [
        (line.sku, line.quantity, line.unit_price, line.line_total) for line in price.lines
    ] == [
        ("MUG-CLASSIC", 3, Decimal("12.50"), Decimal("37.50")),
        ("TEE-BLUE", 1, Decimal("19.90"), Decimal("19.90")),
    ]
    assert price.total == Decimal("57.40")
    assert all(line.pk is None and line.order_id is None for line in price.lines)  # not saved


def test_a_line_is_rounded_to_the_cent_before_the_sum():
    price = order_price(
        items=[
            {"sku": "A", "quantity": 3, "unit_price": "0.333"},
            {"sku": "B", "quantity": 1, "unit_price": "0.004"},
        ]
    )
    assert [line.line_total for line in price.lines] == [Decimal("1.00"), Decimal("0.00")]
    assert price.total == Decimal("1.00")
    assert str(order_price(items=[]).total) == "0.00"
