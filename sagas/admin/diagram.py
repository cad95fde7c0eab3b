"""The step diagram of a saga's page: its steps forward in a row, their compensations below."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from ..models import SagaStatus, SagaStep, StepStatus
from .display import EMPTY, STATUS_COLOURS, clock, duration_text, step_duration

UNDO_STATUSES = {StepStatus.COMPENSATING, StepStatus.COMPENSATED, StepStatus.COMPENSATION_FAILED}


def _forward_node(step: SagaStep) -> SafeString:
    # A compensated step completed its action first: it is drawn green, its undo below.
    shown = StepStatus.COMPLETED if step.status in UNDO_STATUSES else step.status
    facts = [StepStatus(shown).label]
    if step.attempts > 1 or step.status == StepStatus.RUNNING:
        facts.append(f"{step.attempts} attempts")
    if step.status != StepStatus.PENDING:
        facts.append(duration_text(step_duration(step)))
    error = step.error_code if step.status == StepStatus.FAILED else ""
    return format_html(
        '<div class="saga-node saga-node-{}" style="border-color: {}" title="{}">'
        '<strong><span class="saga-node-index">{}</span>{}</strong>'
        '<span class="saga-node-facts">{}</span>{}</div>',
        shown,
        STATUS_COLOURS.get(shown, STATUS_COLOURS[SagaStatus.PENDING]),
        step.error_message or step.get_status_display(),
        step.index + 1,
        step.name,
        _facts(fact for fact in facts if fact != EMPTY),
        format_html('<span class="saga-node-error">{}</span>', error) if error else "",
    )


def _facts(facts: Iterable[str]) -> SafeString:
    """Short facts joined by dots; a line breaks between facts, never inside one."""
    return format_html_join(" · ", '<span class="saga-fact">{}</span>', ((f,) for f in facts))


def _undo_node(step: SagaStep) -> SafeString:
    if step.status == StepStatus.COMPENSATED:
        fact = f"undone {clock(step.compensated_at)}"
    elif step.status == StepStatus.COMPENSATION_FAILED:
        fact = f"undo failed after {step.compensation_attempts} attempts"
    else:
        fact = f"undoing, attempt {step.compensation_attempts + 1}"
    return format_html(
        '<div class="saga-node saga-node-{}" style="border-color: {}" title="{}">'
        "<strong>{}</strong>"
        '<span class="saga-node-facts">{}</span></div>',
        step.status,
        STATUS_COLOURS.get(step.status, STATUS_COLOURS[SagaStatus.COMPENSATED]),
        step.error_message if step.status == StepStatus.COMPENSATION_FAILED else fact,
        step.name,
        _facts([fact]),
    )


def step_diagram(steps: Sequence[SagaStep]) -> SafeString:
    """The forward steps as a row of boxes joined by arrows, and the compensations below them.

    The compensation row runs right to left, each box under the step it undoes.
    """
    undone = [step.status in UNDO_STATUSES for step in steps]
    cells: list[SafeString] = []
    for position, step in enumerate(steps):
        column = 2 * position + 2
        cells.append(
            format_html(
                '<div style="grid-row: 1; grid-column: {}">{}</div>', column, _forward_node(step)
            )
        )
        if position:
            arrow = format_html(
                '<div class="saga-arrow" style="grid-row: 1; grid-column: {}">&rarr;</div>',
                column - 1,
            )
            cells.append(arrow)
        if undone[position]:
            cells.append(
                format_html(
                    '<div style="grid-row: 2; grid-column: {}">{}</div>', column, _undo_node(step)
                )
            )
        next_started_undo = position + 1 < len(steps) and (
            undone[position + 1] or steps[position + 1].status == StepStatus.FAILED
        )
        if undone[position] and next_started_undo:
            cells.append(
                format_html(
                    '<div class="saga-arrow saga-arrow-undo" style="grid-row: 2; grid-column: {}">'
                    "&larr;</div>",
                    column + 1,
                )
            )
    labels = mark_safe(
        '<div class="saga-row-label" style="grid-row: 1; grid-column: 1">forward</div>'
        + (
            '<div class="saga-row-label" style="grid-row: 2; grid-column: 1">compensation</div>'
            if any(undone)
            else ""
        )
    )
    return format_html(
        '<div class="saga-diagram"><div class="saga-diagram-grid">{}{}</div></div>',
        labels,
        format_html_join("", "{}", ((cell,) for cell in cells)),
    )
