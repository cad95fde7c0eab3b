"""Synthetic sagas of 4, 8 and 16 steps whose steps each do one UPDATE, like the bare chain."""

from __future__ import annotations

from sagas.definitions import SagaDefinition, Step, StepContext, register

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
