"""Saga definitions with a child stage, for tests/test_children.py (imported by tests.sagadefs,
so the test workers know them).

The parent takes one unit of its product (`input["sku"]`) and its child (`child_shipping`) one
of its own (`input["child_sku"]`), each given back when compensated: the stock counts every
effect and its undoing. `input["child"]`: what the child's first step does ("decline", "gate":
wait for the file `input["gate"]`, "stuck": a transient error while the file
`input["stuck"]` exists, then it pauses); `input["last"] == "decline"`: the parent's last step
declines.
"""

from __future__ import annotations

import time
from pathlib import Path

from sagas.definitions import Child, RetryPolicy, SagaDefinition, Step, StepContext, register
from sagas.exceptions import BusinessError, TransientError

FAST = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)


def _take(sku: str) -> dict:
    from django.db.models import F

    from inventory.models import Product

    Product.objects.filter(sku=sku).update(stock_on_hand=F("stock_on_hand") - 1)
    return {"sku": sku}


def _give(ctx: StepContext) -> None:
    from django.db.models import F

    from inventory.models import Product

    if ctx.output:
        sku = ctx.output["sku"]
        Product.objects.filter(sku=sku).update(stock_on_hand=F("stock_on_hand") + 1)


def give_unless_stuck(ctx: StepContext) -> None:
    """A compensation that fails while the file `input["undo_stuck"]` exists."""
    if Path(ctx.input.get("undo_stuck", "/nonexistent")).exists():
        raise TransientError("The carrier's cancellation desk is down.", code="desk_down")
    _give(ctx)


def take_parent(ctx: StepContext) -> dict:
    return _take(ctx.input["sku"])


def book(ctx: StepContext) -> dict:
    """The child's first step: takes its unit, then does what `input["child"]` says."""
    behaviour = ctx.input.get("child", "")
    if behaviour == "decline":
        raise BusinessError("No carrier.", code="no_carrier")
    if behaviour == "gate":
        gate = Path(ctx.input["gate"])
        Path(f"{gate}.started").touch()
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    if behaviour == "stuck" and Path(ctx.input["stuck"]).exists():
        raise TransientError("Carrier down.", code="carrier_down")
    return {**_take(ctx.input["sku"]), "carrier": "dhl"}


def label(ctx: StepContext) -> dict:
    return {"label": f"L-{ctx.outputs['book']['carrier']}"}


def undo(ctx: StepContext) -> None:
    return None


def last(ctx: StepContext) -> dict:
    if ctx.input.get("last") == "decline":
        raise BusinessError("Declined at the end.", code="declined_last")
    return {"shipped_with": ctx.outputs["shipping"]["label"]["label"]}


def shipping_input(ctx: StepContext) -> dict:
    """The child's input, from the parent's."""
    keep = ("child", "gate", "stuck", "undo_stuck")
    return {"sku": ctx.input["child_sku"], **{k: ctx.input[k] for k in keep if k in ctx.input}}


register(
    SagaDefinition(
        name="child_shipping",
        steps=[
            Step("book", book, _give, retry=FAST, on_exhausted="pause"),
            Step("label", label, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="parent_order",
        steps=[
            Step("take", take_parent, _give, retry=FAST),
            Child("shipping", saga="child_shipping", input=shipping_input),
            Step("last", last, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="parent_with_deadline",
        steps=[
            Step("take", take_parent, _give, retry=FAST),
            Child("shipping", saga="child_shipping", input=shipping_input),
            Step("last", last, undo, retry=FAST),
        ],
        deadline=2,
    )
)
register(
    SagaDefinition(
        name="child_fragile",
        steps=[
            Step("book", book, give_unless_stuck, retry=FAST, compensation_retry=FAST),
            Step("label", label, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="parent_fragile",
        steps=[
            Step("take", take_parent, _give, retry=FAST),
            Child("shipping", saga="child_fragile", input=shipping_input),
            Step("last", last, undo, retry=FAST),
        ],
    )
)
