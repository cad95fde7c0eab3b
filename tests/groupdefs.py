"""Saga definitions with groups, for tests/test_groups.py (imported by tests.sagadefs, so the
test workers know them).

Every member takes one unit of stock of a product (a database-local effect, committed with the
member's row or not at all) and its compensation gives it back: the tests count stock to see
that each member ran once and was undone once. What a member does besides is in the saga's
input, `behave[<member>]`: "decline" (a business error), "flaky" (a transient error on its first
attempt), "stuck" (transient errors while the file `input["stuck"]` exists), "gate" (it waits
for the file `<input["gate"]>.<member>` to exist; "gate_decline": then declines), a number
(it sleeps that many seconds).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

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
from tests.childdefs import shipping_input, take_parent

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
    elif behaviour in ("gate", "gate_decline"):
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
    if ctx.input.get("behave", {}).get(ctx.step) in ("decline", "gate_decline"):
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


# -- faults in groups (tests/test_groups_faults.py) ------------------------------------------
#
# `act` takes one unit of stock (committed with the member's row, or not at all), then notes
# the attempt in the file `input["runs"]` (an effect outside the transaction, as a provider's
# call would be: it stays when the attempt dies), then does what `input["faults"][<member>]`
# lists, in order: "die_once" (SIGKILL its own process, the first time), "die" (every time),
# "hang" (ignore the soft time limit), "gate" (wait for `<input["gate"]>.<member>`), "decline",
# "flaky" (a transient error on its first attempt). Its compensation, `give_back`, notes itself
# and returns the unit; it may fail, or die, as the input says.

TWO = RetryPolicy(max_attempts=2, backoff=0.05, backoff_max=0.1)
# A retry that comes late enough for an operator to act between two attempts.
SLOW = RetryPolicy(max_attempts=2, backoff=4, backoff_max=4, jitter=False)


def note(ctx: StepContext, line: str) -> None:
    with Path(ctx.input["runs"]).open("a") as runs:
        runs.write(f"{line}\n")


def act(ctx: StepContext) -> dict:
    """Take one unit of the member's product, note the attempt, then misbehave as told."""
    import os
    import signal

    from django.db.models import F

    from inventory.models import Product

    started = time.time()
    sku = _sku(ctx)
    Product.objects.filter(sku=sku).update(stock_on_hand=F("stock_on_hand") - 1)
    note(ctx, f"run {ctx.step} {ctx.attempt} {started}")
    for fault in ctx.input.get("faults", {}).get(ctx.step, []):
        if fault == "die_once":
            died = Path(f"{ctx.input['runs']}.{ctx.step}.died")
            if not died.exists():
                died.touch()
                os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "hang":
            from sagas.testing.faults import hang

            hang()
        elif fault == "gate":
            gate = Path(f"{ctx.input['gate']}.{ctx.step}")
            Path(f"{gate}.started").touch()
            deadline = time.monotonic() + 30
            while not gate.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        elif fault == "decline":
            raise BusinessError("Declined.", code="declined")
        elif fault == "flaky" and ctx.attempt == 1:
            raise TransientError("Try again.", code="hiccup")
    return {"sku": sku, "attempt": ctx.attempt, "started": started, "finished": time.time()}


def give_back(ctx: StepContext) -> None:
    """Give the unit back (nothing when the member never completed). A member listed in
    `input["undo_fails"]` fails (transiently) while the file `input["undo_stuck"]` exists; one
    listed in `input["undo_dies"]` gives the unit back, then kills its own process, once. Each
    first sleeps `input["undo_sleep"]` seconds (0 by default)."""
    import os
    import signal

    from django.db.models import F

    from inventory.models import Product

    began = time.time()
    note(ctx, f"undo {ctx.step} {ctx.attempt} {began}")
    time.sleep(float(ctx.input.get("undo_sleep", 0)))
    stuck = ctx.input.get("undo_stuck")
    if ctx.step in ctx.input.get("undo_fails", []) and stuck and Path(stuck).exists():
        raise TransientError("The stock service is down.", code="stock_down")
    if ctx.output is None:
        return
    Product.objects.filter(sku=ctx.output["sku"]).update(stock_on_hand=F("stock_on_hand") + 1)
    note(ctx, f"undone {ctx.step} {began} {time.time()}")
    died = Path(f"{ctx.input['runs']}.{ctx.step}.undo_died")
    if ctx.step in ctx.input.get("undo_dies", []) and not died.exists():
        died.touch()
        os.kill(os.getpid(), signal.SIGKILL)


def acting(name: str, **options: Any) -> Step:
    options.setdefault("retry", FAST)
    return Step(name, act, give_back, compensation_retry=TWO, **options)


def faulty(name: str, members: list[Step], *, last_step: bool = True, **options: Any):
    grouped = ("concurrency", "concurrent_compensation")
    group_options = {k: options.pop(k) for k in grouped if k in options}
    steps: list[Any] = [
        Step("first", first, undo, retry=FAST),
        Group("parallel", members=members, **group_options),
    ]
    if last_step:
        steps.append(Step("last", last, undo, retry=FAST))
    return SagaDefinition(name=name, steps=steps, deadline=None, **options)


register(faulty("faults_group", [acting("a"), acting("b"), acting("c")]))
register(
    faulty(
        "faults_group_continue",
        [acting("a"), acting("b"), acting("c")],
        continue_compensation_on_failure=True,
    )
)
# Members that may hang: a time limit of 1 s, killed 2 s later (the suite's grace).
register(
    faulty(
        "faults_group_hung",
        [acting("a", time_limit=1), acting("b", time_limit=1), acting("c", time_limit=1)],
    )
)
# Their compensations at the same time, then the stages before the group's.
register(
    faulty(
        "faults_group_together",
        [acting("a"), acting("b"), acting("c")],
        concurrent_compensation=True,
    )
)
register(
    faulty(
        "faults_group_together_continue",
        [acting("a"), acting("b"), acting("c")],
        concurrent_compensation=True,
        continue_compensation_on_failure=True,
    )
)
# Two at a time: the third member is sent when one of the first two ends.
register(faulty("faults_group_paced", [acting("a"), acting("b"), acting("c")], concurrency=2))
# Member b retries 4 s after a transient failure.
register(faulty("faults_group_slow_retry", [acting("a"), acting("b", retry=SLOW), acting("c")]))
# One at a time; b may have half-happened (`compensate_failed_step`).
register(
    faulty(
        "faults_group_one_at_a_time",
        [acting("a"), acting("b", compensate_failed_step=True), acting("c")],
        concurrency=1,
    )
)
# Members that may hang, killed apart: a (1 s, killed 2 s later) twice, which fails the group,
# well before b (8 s, killed 2 s later) is killed once.
register(
    faulty(
        "faults_group_hung_apart",
        [acting("a", time_limit=1), acting("b", time_limit=8), acting("c", time_limit=1)],
    )
)


def act_then_stuck(ctx: StepContext) -> dict:
    """`act`, then a transient error while the file `input["stuck"]` exists: with `STUCK` and
    `on_exhausted="pause"`, the member pauses its saga when its attempts run out."""
    output = act(ctx)
    if Path(ctx.input["stuck"]).exists():
        raise TransientError("Still down.", code="down")
    return output


# b pauses the saga when it stays stuck (`input["stuck"]` exists) through its three attempts.
register(
    faulty(
        "faults_group_pausing",
        [
            acting("a"),
            Step(
                "b",
                act_then_stuck,
                give_back,
                retry=STUCK,
                on_exhausted="pause",
                compensation_retry=TWO,
            ),
            acting("c"),
        ],
    )
)


# -- every shape, for the failure matrix (tests/test_testkit.py) ------------------------------
#
# A step, a listed group, a child saga, a map and a step; each takes one unit of stock of a
# product of its own (`input["sku"]`, `input["skus"][<member>]`, the child's
# `input["child_sku"]`, each line's sku) and gives it back when compensated.


register(
    SagaDefinition(
        name="every_shape",
        steps=[
            Step("first", take_parent, give, retry=FAST),
            Group("parallel", members=[member("a"), member("b")]),
            Child("shipping", saga="child_shipping", input=shipping_input),
            Group("lines", items=lines, step=member("reserve")),
            Step("last", last, undo, retry=FAST),
        ],
    )
)
