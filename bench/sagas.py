"""Synthetic sagas of 4, 8 and 16 steps whose steps each do one UPDATE, like the bare chain; a
group of 4 such members and a step, like the bare chord; the 4 steps with the middle two in a
child saga; sagas that wait (`bench.waits`)."""

from __future__ import annotations

from sagas.definitions import (
    Child,
    Discrepancy,
    Group,
    ReconcileContext,
    SagaDefinition,
    Step,
    StepContext,
    Wait,
    register,
)

from .tasks import row_exists, touch

STEP_COUNTS = (4, 8, 16)


def touch_step(ctx: StepContext) -> None:
    touch(ctx.input["row"])


def untouch_step(ctx: StepContext) -> None:
    return None


for count in STEP_COUNTS:
    register(
        SagaDefinition(
            name=f"bench_{count}",
            steps=[Step(f"step_{i}", touch_step, untouch_step) for i in range(count)],
        )
    )


# A group of 4 members, then a step: each does one UPDATE of a row of its own, named by the
# member's (or the step's) name in `input["rows"]`, as each task of the bare chord does: the
# members share no row but the saga's.
GROUP_MEMBERS = 4
GROUP_STAGES = (*(f"member_{i}" for i in range(GROUP_MEMBERS)), "after")


def touch_own_row(ctx: StepContext) -> None:
    touch(ctx.input["rows"][ctx.step])


register(
    SagaDefinition(
        name="bench_group",
        steps=[
            Group(
                "members",
                members=[Step(name, touch_own_row, untouch_step) for name in GROUP_STAGES[:-1]],
            ),
            Step(GROUP_STAGES[-1], touch_own_row, untouch_step),
        ],
    )
)


# The steps of `bench_4`, the middle two in a child saga (given the parent's input, its row):
# what a child costs against the same steps inline.
register(
    SagaDefinition(
        name="bench_child_inner",
        steps=[Step(f"step_{i}", touch_step, untouch_step) for i in (1, 2)],
    )
)
register(
    SagaDefinition(
        name="bench_with_child",
        steps=[
            Step("step_0", touch_step, untouch_step),
            Child("inner", saga="bench_child_inner"),
            Step("step_3", touch_step, untouch_step),
        ],
    )
)


# Waits (`make bench-waits`): sagas waiting for an event, for days, the step after each wait a
# no-op; and a timer of a few seconds, for the timeouts' lateness.
WAIT_DAYS = 7 * 86400
TIMER_SECONDS = 3


def nothing(ctx: StepContext) -> None:
    return None


register(
    SagaDefinition(
        name="bench_wait",
        steps=[
            Wait("go", event="go", timeout=WAIT_DAYS, on_timeout="continue"),
            Step("after_go", nothing, untouch_step),
            Wait("later", event="later", timeout=WAIT_DAYS, on_timeout="continue"),
            Step("after_later", nothing, untouch_step),
        ],
    )
)
register(
    SagaDefinition(
        name="bench_timer",
        steps=[Wait("timer", timeout=TIMER_SECONDS), Step("after_timer", nothing, untouch_step)],
    )
)


# Reconciliation (`make bench`): finished sagas whose check reads one row of the outside world
# (the row their step touched), as a ledger lookup by key would.
def ledger_agrees(ctx: ReconcileContext) -> list[Discrepancy]:
    return [] if row_exists(ctx.input["row"]) else [Discrepancy("row_missing", "No row.")]


register(
    SagaDefinition(
        name="bench_reconciled",
        steps=[Step("step_0", touch_step, untouch_step)],
        reconcile=ledger_agrees,
    )
)
