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

from sagas.definitions import (
    Child,
    Group,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepContext,
    register,
)
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


# -- a group's child members (tests/test_group_children.py) ------------------------------------
#
# The group `fulfil` reserves one unit of `input["member_sku"]` (a step member; "decline" in
# `input["reserve"]` declines, "wait" waits for the file `input["gate"]` to be started) while
# its child member `ship` runs `child_shipping`. The map `parcels` starts one child per parcel
# of `input["parcels"]`; the parcel `input["bad_parcel"]`'s child declines.


def reserve(ctx: StepContext) -> dict:
    if Path(ctx.input.get("reserve_stuck", "/nonexistent")).exists():
        raise TransientError("The warehouse is down.", code="warehouse_down")
    if ctx.input.get("reserve") == "decline":
        raise BusinessError("Out of stock.", code="out_of_stock")
    if ctx.input.get("reserve") == "after_child_started":
        gate = Path(f"{ctx.input['gate']}.started")
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        raise BusinessError("Out of stock.", code="out_of_stock")
    return _take(ctx.input["member_sku"])


def last_of_group(ctx: StepContext) -> dict:
    if ctx.input.get("last") == "decline":
        raise BusinessError("Declined at the end.", code="declined_last")
    return {"shipped_with": ctx.outputs["fulfil"]["ship"]["label"]["label"]}


def broken_while_flagged(ctx: StepContext) -> dict:
    """A child's input that raises while the file `input["broken"]` exists (a bug, then its
    fix deployed)."""
    if Path(ctx.input.get("broken", "/nonexistent")).exists():
        raise KeyError("carrier")
    return shipping_input(ctx)


def parcels(ctx: StepContext) -> list:
    return list(ctx.input["parcels"])


def parcel_input(ctx: StepContext) -> dict:
    behaviour = "decline" if ctx.item == ctx.input.get("bad_parcel") else ""
    return {"sku": ctx.input["child_sku"], "child": behaviour}


def last_of_map(ctx: StepContext) -> dict:
    return {"labels": [o and o["label"]["label"] for o in ctx.outputs["parcels"]]}


def _group_parent(name: str, child_input, reserving: str = "compensate", **group) -> SagaDefinition:
    return SagaDefinition(
        name=name,
        steps=[
            Step("take", take_parent, _give, retry=FAST),
            Group(
                "fulfil",
                members=[
                    Step("reserve", reserve, _give, retry=FAST, on_exhausted=reserving),
                    Child("ship", saga="child_shipping", input=child_input),
                ],
                **group,
            ),
            Step("last", last_of_group, undo, retry=FAST),
        ],
    )


register(_group_parent("parent_group_child", shipping_input))
register(_group_parent("parent_group_child_together", shipping_input, concurrent_compensation=True))
register(_group_parent("parent_group_child_broken", broken_while_flagged))
# `reserve` pauses the saga when the file `input["reserve_stuck"]` exists through its attempts.
register(_group_parent("parent_group_child_pausing", shipping_input, reserving="pause"))
for tolerated in (0, 1):
    register(
        SagaDefinition(
            name=f"parent_map_children_{tolerated}",
            steps=[
                Step("take", take_parent, _give, retry=FAST),
                Group(
                    "parcels",
                    items=parcels,
                    step=Child("ship", saga="child_shipping", input=parcel_input),
                    tolerated_failures=tolerated,
                ),
                Step("last", last_of_map, undo, retry=FAST),
            ],
        )
    )
