"""Two engine bugs, for the test kit's own tests: imported only by the worker they start.

A saga whose input says `"break_engine": "wrong_order"` has its compensations run first step
first; one that says `"twice"` has a redelivered compensation run again, as an engine that
forgot its duplicate check would. Every other saga runs on the real engine.
"""

from __future__ import annotations

from typing import Any

from django.db import transaction

from sagas import engine
from sagas.engine.unit import DUPLICATE, Unit, lock, resolve
from sagas.models import EventKind, StepStatus


def broken(unit: Unit, how: str) -> bool:
    return unit.saga.input.get("break_engine") == how


_to_compensate = Unit.to_compensate


def to_compensate_first_step_first(self: Unit) -> list[Any]:
    owed = _to_compensate(self)
    return owed[::-1] if broken(self, "wrong_order") else owed


_compensation_attempt = engine.compensation_attempt


def compensation_attempt_without_its_duplicate_check(
    saga_id: str,
    index: int,
    *,
    epoch: int,
    fault: Any = None,
    bound: float | None = None,
    member: int | None = None,
) -> engine.Outcome:
    with transaction.atomic():
        unit = lock(saga_id)
        step = unit.steps[index]
        if broken(unit, "twice") and step.status == StepStatus.COMPENSATED:
            ctx = unit.context(step, compensation=True)
            if step.compensation:
                resolve(step.compensation)(ctx)
            unit.move_step(step, StepStatus.COMPENSATED, EventKind.STEP_COMPENSATED, {"attempt": 1})
            unit.save()
            return DUPLICATE  # not "done", which would have the message delivered yet again
    return _compensation_attempt(
        saga_id, index, epoch=epoch, fault=fault, bound=bound, member=member
    )


Unit.to_compensate = to_compensate_first_step_first  # type: ignore[method-assign]
engine.compensation_attempt = compensation_attempt_without_its_duplicate_check
