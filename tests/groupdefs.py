"""Saga definitions with groups, for tests/test_groups.py (imported by tests.sagadefs, so the
test workers know them).

Every member takes one unit of stock of a product (a database-local effect, committed with the
member's row or not at all) and its compensation gives it back: the tests count stock to see
that each member ran once and was undone once. What a member does besides is in the saga's
input, `behave[<member>]`: "decline" (a business error), "flaky" (a transient error on its first
attempt), "stuck" (transient errors while the file `input["stuck"]` exists), "gate" (it waits
for the file `<input["gate"]>.<member>` to exist), a number (it sleeps that many seconds).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sagas.definitions import Group, RetryPolicy, SagaDefinition, Step, StepContext, register
from sagas.exceptions import BusinessError, TransientError

FAST = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)
# A member stuck on a transient error: tries a few times, then pauses its saga.
STUCK = RetryPolicy(max_attempts=3, backoff=0.05, backoff_max=0.1)


def _sku(ctx: StepContext) -> str:
    return str(ctx.item) if ctx.item is not None else str(ctx.input["skus"][ctx.step])


def _behave(ctx: StepContext) -> None:
    behaviour: Any = ctx.input.get("behave", {}).get(ctx.step, "")
    if isinstance(behaviour, int | float):
        time.sleep(behaviour)
    elif behaviour == "flaky" and ctx.attempt == 1:
        raise TransientError("Try again.", code="hiccup")
    elif behaviour == "stuck" and Path(ctx.input["stuck"]).exists():
        raise TransientError("Still down.", code="down")
    elif behaviour == "gate":
        gate = Path(f"{ctx.input['gate']}.{ctx.step}")
        Path(f"{gate}.started").touch()
        deadline = time.monotonic() + 30
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def take(ctx: StepContext) -> dict:
    """Take one unit of the member's product out of stock."""
    from django.db.models import F

    from inventory.models import Product

    started = time.time()
    sku = _sku(ctx)
    Product.objects.filter(sku=sku).update(stock_on_hand=F("stock_on_hand") - 1)
    _behave(ctx)
    if ctx.input.get("behave", {}).get(ctx.step) == "decline":
        raise BusinessError("Declined.", code="declined")
    return {
        "sku": sku,
        "key": ctx.idempotency_key,
        "attempt": ctx.attempt,
        "started": started,
        "finished": time.time(),
    }


def give(ctx: StepContext) -> None:
    """Give the unit back (nothing to give when the member never completed)."""
    from django.db.models import F

    from inventory.models import Product

    if ctx.output is None:
        return
    Product.objects.filter(sku=ctx.output["sku"]).update(stock_on_hand=F("stock_on_hand") + 1)


def first(ctx: StepContext) -> dict:
    return {"step": ctx.step}


def undo(ctx: StepContext) -> None:
    return None


def last(ctx: StepContext) -> dict:
    """Reads the group's output; declines when the input says `"last": "decline"`."""
    if ctx.input.get("last") == "decline":
        raise BusinessError("Declined at the end.", code="declined_last")
    return {"saw": ctx.outputs.get("parallel", ctx.outputs.get("lines"))}


def lines(ctx: StepContext) -> list:
    return list(ctx.input.get("lines", []))


def line_key(item: Any) -> str:
    return str(item["sku"]) if isinstance(item, dict) else str(item)


def member(name: str, **options: Any) -> Step:
    return Step(name, take, give, retry=options.pop("retry", FAST), **options)


def listed(name: str = "group_listed", **options: Any) -> SagaDefinition:
    return SagaDefinition(
        name=name,
        steps=[
            Step("first", first, undo, retry=FAST),
            Group(
                "parallel",
                members=[
                    member("a"),
                    member("b", retry=STUCK, on_exhausted="pause"),
                    member("c"),
                ],
                **options,
            ),
            Step("last", last, undo, retry=FAST),
        ],
        deadline=None,
    )


register(listed())
register(listed("group_listed_one_at_a_time", concurrency=1))
register(
    SagaDefinition(
        name="group_first",
        steps=[
            Group("parallel", members=[member("a"), member("c")]),
            Step("last", last, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="group_map",
        steps=[
            Step("first", first, undo, retry=FAST),
            Group("lines", items=lines, step=member("reserve"), max_fan_out=5),
            Step("last", last, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="group_map_tolerant",
        steps=[
            Step("first", first, undo, retry=FAST),
            Group(
                "lines",
                items=lines,
                key=line_key,
                step=member("reserve"),
                tolerated_failures=1,
                concurrency=2,
            ),
            Step("last", last, undo, retry=FAST),
        ],
    )
)
register(
    SagaDefinition(
        name="group_with_deadline",
        steps=[
            Step("first", first, undo, retry=FAST),
            Group("parallel", members=[member("a"), member("b"), member("c")]),
            Step("last", last, undo, retry=FAST),
        ],
        deadline=2,
    )
)
