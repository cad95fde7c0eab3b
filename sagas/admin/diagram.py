"""The step diagram of a saga's page: its steps forward in a row, their compensations below.

This module lays the diagram out (which box goes in which cell of the grid, with which facts);
`admin/sagas/saga/diagram.html` draws it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from django.template.loader import render_to_string
from django.utils.safestring import SafeString

from ..models import SagaMember, SagaStatus, SagaStep, StepStatus
from .display import EMPTY, STATUS_COLOURS, clock, duration_text, step_duration

UNDO_STATUSES = {StepStatus.COMPENSATING, StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED}


@dataclass(frozen=True)
class Node:
    """One box: a step's action (with its number) or its compensation; a group's box holds
    its members' boxes, side by side (`members`)."""

    name: str
    status: str
    colour: str
    title: str
    facts: list[str] = field(default_factory=list)
    number: int | None = None
    error: str = ""
    members: list[Node] = field(default_factory=list)


@dataclass(frozen=True)
class Cell:
    """What one cell of the grid holds: a box, or an arrow (`forward` or `undo`)."""

    row: int
    column: int
    node: Node | None = None
    arrow: str = ""


def _forward_node(step: SagaStep, members: Sequence[SagaMember] = ()) -> Node:
    # A compensated step completed its action first: it is drawn green, its undo below.
    shown = StepStatus.COMPLETED if step.status in UNDO_STATUSES else step.status
    facts = [StepStatus(shown).label]
    if members:
        done = sum(1 for m in members if m.status in (StepStatus.COMPLETED, *UNDO_STATUSES))
        facts.append(f"{done} of {len(members)} members")
    elif step.attempts > 1 or step.status == StepStatus.RUNNING:
        facts.append(f"{step.attempts} attempts")
    if step.status != StepStatus.PENDING:
        facts.append(duration_text(step_duration(step)))
    return Node(
        name=step.name,
        status=shown,
        colour=STATUS_COLOURS.get(shown, STATUS_COLOURS[SagaStatus.PENDING]),
        title=step.error_message or step.get_status_display(),
        facts=[fact for fact in facts if fact != EMPTY],
        number=step.index + 1,
        error=step.error_code if step.status == StepStatus.FAILED else "",
        members=[_member_node(m) for m in members],
    )


def _member_node(member: SagaMember) -> Node:
    """A group's member, in its group's box: its status as it is (undone ones too)."""
    title = member.get_status_display()
    if member.error_message:
        title += f": {member.error_message}"
    return Node(
        name=member.name,
        status=member.status,
        colour=STATUS_COLOURS.get(member.status, STATUS_COLOURS[SagaStatus.PENDING]),
        title=title,
        error=member.error_code if member.status == StepStatus.FAILED else "",
    )


def _undo_node(step: SagaStep) -> Node:
    if step.status == StepStatus.COMPENSATED:
        fact = f"undone {clock(step.compensated_at)}"
    elif step.status == StepStatus.COMPENSATION_FAILED:
        fact = f"undo failed after {step.compensation_attempts} attempts"
    else:
        fact = f"undoing, attempt {step.compensation_attempts + 1}"
    return Node(
        name=step.name,
        status=step.status,
        colour=STATUS_COLOURS.get(step.status, STATUS_COLOURS[SagaStatus.COMPENSATED]),
        title=step.error_message if step.status == StepStatus.COMPENSATION_FAILED else fact,
        facts=[fact],
    )


def diagram_cells(
    steps: Sequence[SagaStep], members: dict[int, list[SagaMember]] | None = None
) -> list[Cell]:
    """The forward steps as a row of boxes joined by arrows, and the compensations below them;
    a group's box holds its members' (`members`, by stage).

    The compensation row runs right to left, each box under the step it undoes.
    """
    members = members or {}
    undone = [step.status in UNDO_STATUSES for step in steps]
    cells: list[Cell] = []
    for position, step in enumerate(steps):
        column = 2 * position + 2
        cells.append(Cell(1, column, node=_forward_node(step, members.get(step.index, ()))))
        if position:
            cells.append(Cell(1, column - 1, arrow="forward"))
        if undone[position]:
            cells.append(Cell(2, column, node=_undo_node(step)))
        next_started_undo = position + 1 < len(steps) and (
            undone[position + 1] or steps[position + 1].status == StepStatus.FAILED
        )
        if undone[position] and next_started_undo:
            cells.append(Cell(2, column + 1, arrow="undo"))
    return cells


def step_diagram(
    steps: Sequence[SagaStep], members: dict[int, list[SagaMember]] | None = None
) -> SafeString:
    cells = diagram_cells(steps, members)
    context = {"cells": cells, "compensating": any(cell.row == 2 for cell in cells)}
    return SafeString(render_to_string("admin/sagas/saga/diagram.html", context))
