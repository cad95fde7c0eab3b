"""A bulk skip: the stage of one name (or a group's member, `<group>.<member>`, as the timeline
names it) marked as done in every saga a filter matches, with one output (an outage of a
provider over, its payments confirmed out of band)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError

from .. import engine
from ..engine import Plan, waits
from ..engine.operator import check_output
from ..models import BulkAction, OperatorAction, SagaMember


@dataclass(frozen=True)
class BulkSkip:
    """Which stage a bulk skip marks as done (by name: its index may differ from saga to
    saga; a group's failed member by `<group>.<member>`), the output each is given, and the
    note on each saga's timeline."""

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
        target = self.target(saga_id, stage_names)
        if isinstance(target, str):
            return Plan(OperatorAction.SKIP, False, target)
        index, member = target
        plan = engine.plan(saga_id, OperatorAction.SKIP, index, locked=False, member=member)
        if not plan.allowed:
            return plan
        try:
            check_output(saga_id, index, self.output, member=member)
        except ValidationError as error:
            return Plan(OperatorAction.SKIP, False, refused_output(error))
        return plan

    def target(self, saga_id: UUID, stage_names: tuple[str, ...]) -> tuple[int, int | None] | str:
        """In one saga whose stages have these names: the stage's index, and the position of
        the group's member it names (or None); or why it names nothing there."""
        if self.stage in stage_names:
            return stage_names.index(self.stage), None
        group, _, name = self.stage.partition(".")
        if not name or group not in stage_names:
            return no_such_stage(self.stage)
        index = stage_names.index(group)
        members = SagaMember.objects.filter(saga_id=saga_id, stage=index, name=name)
        position = members.values_list("position", flat=True).first()
        if position is None:
            return f"The saga's group {group} has no member {name}."
        return index, position


def no_such_stage(stage: str) -> str:
    return f"The saga has no stage {stage}."


def refused_output(error: ValidationError) -> str:
    """Why a saga's stage refuses a bulk skip's output, in a bulk item's reason."""
    return f"The stage refuses the output: {' '.join(error.messages)}"[:500]
