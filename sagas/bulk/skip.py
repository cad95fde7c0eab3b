"""A bulk skip: the stage of one name marked as done in every saga a filter matches, with one
output (an outage of a provider over, its payments confirmed out of band)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError

from .. import engine
from ..engine import Plan, waits
from ..engine.operator import check_output
from ..models import BulkAction, OperatorAction


@dataclass(frozen=True)
class BulkSkip:
    """Which stage a bulk skip marks as done (by name: its index may differ from saga to
    saga), the output each is given, and the note on each saga's timeline."""

    stage: str
    output: Any = None
    note: str = ""

    @classmethod
    def of(cls, bulk_action: BulkAction) -> BulkSkip:
        return cls(bulk_action.stage or "", bulk_action.output, bulk_action.note or "")

    def problems(self) -> dict[str, str]:
        """Why it cannot be used, by field: the API's and the admin's field errors. What one
        saga's stage refuses (its payload limit, a wait's validator) is that saga's plan's."""
        problems = {}
        if not self.stage:
            problems["stage"] = "Name the stage to mark as done."
        if not waits._storable(self.output):
            problems["output"] = "Text with a NUL character or a lone surrogate cannot be stored."
        return problems

    def plan(self, saga_id: UUID, stage_names: tuple[str, ...]) -> Plan:
        """What it would do to one saga whose stages have these names, from the rows as they
        are (`engine.plan`, not locked), the output checked as that stage checks it."""
        if self.stage not in stage_names:
            return Plan(OperatorAction.SKIP, False, no_such_stage(self.stage))
        index = stage_names.index(self.stage)
        plan = engine.plan(saga_id, OperatorAction.SKIP, index, locked=False)
        if not plan.allowed:
            return plan
        try:
            check_output(saga_id, index, self.output)
        except ValidationError as error:
            return Plan(OperatorAction.SKIP, False, refused_output(error))
        return plan


def no_such_stage(stage: str) -> str:
    return f"The saga has no stage {stage}."


def refused_output(error: ValidationError) -> str:
    """Why a saga's stage refuses a bulk skip's output, in a bulk item's reason."""
    return f"The stage refuses the output: {' '.join(error.messages)}"[:500]
