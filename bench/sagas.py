"""Synthetic sagas of 4, 8 and 16 steps whose steps each do one UPDATE, like the bare chain;
sagas that wait (`bench.waits`)."""

from __future__ import annotations

from sagas.definitions import SagaDefinition, Step, StepContext, Wait, register

from .tasks import touch

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
