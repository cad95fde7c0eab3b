"""How the saga admin shows a saga's facts: status badges, times, durations, JSON, event details.

Small functions of a value or a row, shared by the saga's list, its page, its inlines and the
confirmation page of the operator actions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from ..models import SagaMember, SagaStatus, SagaStep, StepStatus

EMPTY = "—"

# Colours of the status badges: the saga's and its steps' statuses share one palette.
STATUS_COLOURS: dict[str, str] = {
    SagaStatus.PENDING: "#6b7280",
    SagaStatus.RUNNING: "#1d6fd8",
    SagaStatus.WAITING: "#0e7490",
    SagaStatus.COMPENSATING: "#c26a00",
    SagaStatus.COMPLETED: "#1f7a3a",
    SagaStatus.COMPENSATED: "#6f42c1",
    SagaStatus.FAILED: "#c0262d",
    StepStatus.COMPENSATION_FAILED: "#8f1117",
}

# Event kinds by the colour of their label in the timeline.
EVENT_TONES: dict[str, str] = {
    "saga_completed": "good",
    "step_completed": "good",
    "step_retrying": "warn",
    "compensation_retrying": "warn",
    "step_failed": "bad",
    "saga_paused": "bad",
    "compensation_failed": "bad",
    "saga_failed": "bad",
    "deadline_passed": "bad",
    "recovered": "warn",
    "compensation_started": "undo",
    "step_compensated": "undo",
    "saga_compensated": "undo",
    "operator_retry": "operator",
    "operator_compensate": "operator",
    "operator_resolve": "operator",
    "wait_completed": "good",
    "wait_failed": "bad",
    "wait_timed_out": "warn",
    "signal_refused": "warn",
}


# -- small renderers ----------------------------------------------------------------------------


def duration_text(delta: timedelta | None) -> str:
    """A duration as an operator reads it: `85 ms`, `4.2 s`, `3 min 5 s`, `2 h 10 min`."""
    if delta is None:
        return EMPTY
    seconds = max(delta.total_seconds(), 0.0)
    if seconds < 1:
        return f"{int(seconds * 1000)} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest} s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    return f"{hours // 24} d {hours % 24} h"


def status_badge(status: str, label: str) -> SafeString:
    colour = STATUS_COLOURS.get(status, STATUS_COLOURS[SagaStatus.PENDING])
    return format_html(
        '<span class="saga-badge saga-status-{}" style="background-color: {}">{}</span>',
        status,
        colour,
        label,
    )


def step_duration(step: SagaStep | SagaMember) -> timedelta | None:
    if step.started_at is None or step.finished_at is None:
        return None
    return step.finished_at - step.started_at


def clock(moment: datetime | None) -> str:
    """A time with milliseconds in the current time zone, with its date unless it is today."""
    if moment is None:
        return EMPTY
    local = timezone.localtime(moment)
    shown = "%H:%M:%S.%f" if local.date() == timezone.localdate() else "%Y-%m-%d %H:%M:%S.%f"
    return local.strftime(shown)[:-3]


def timestamp(moment: datetime | None) -> str:
    """A date and time to the second, in the current time zone: `2026-11-22 01:00:54`."""
    if moment is None:
        return EMPTY
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M:%S")


def error_text(code: str, message: str) -> str:
    """A saga's or a step's error as stored: `card_declined: The card was declined.`"""
    return f"{code}: {message}" if code else EMPTY


def pretty_json(value: Any) -> SafeString:
    return format_html('<pre class="saga-json">{}</pre>', json.dumps(value, indent=2, default=str))


# -- timeline details ---------------------------------------------------------------------------


# Keys of an event's detail that `event_detail_text` words itself; others are shown as they are.
SHOWN_DETAILS = frozenset(
    [
        "code",
        "message",
        "duration_ms",
        "attempt",
        "retry_in_s",
        "steps",
        "reason",
        "from",
        "actor",
        "bulk_action",
        "worker",
        "exhausted",
    ]
)


def event_detail_text(detail: dict[str, Any]) -> str:
    """An event's detail as one readable line: `card_declined: The card was declined · 12 ms`."""
    parts: list[str] = []
    if detail.get("code"):
        parts.append(f"{detail['code']}: {detail.get('message', '')}".rstrip(": "))
    if "duration_ms" in detail:
        parts.append(duration_text(timedelta(milliseconds=detail["duration_ms"])))
    if "attempt" in detail:
        parts.append(f"attempt {detail['attempt']}")
    if "retry_in_s" in detail:
        parts.append(f"retry in {detail['retry_in_s']} s")
    if detail.get("steps"):
        parts.append(" → ".join(detail["steps"]))
    if detail.get("reason"):
        parts.append(str(detail["reason"]))
    if detail.get("from"):
        parts.append(f"from {detail['from']}")
    if detail.get("actor"):
        parts.append(f"by {detail['actor']}")
    if detail.get("bulk_action"):
        parts.append(f"in bulk action {detail['bulk_action']}")
    if detail.get("worker"):
        parts.append(f"on {detail['worker']}")
    parts.extend(f"{key}: {value}" for key, value in detail.items() if key not in SHOWN_DETAILS)
    return " · ".join(parts)


def search_help_text(search_fields: Sequence[str], *, whole: str = "") -> str:
    """What the list's search looks in: `Search by saga id, name or order id (or a part of
    one), or by key.`, where `whole` names what is matched whole only.

    A lookup is named by its last part (`input__order_id`: "order id"), without the prefix
    that picks the kind of match (`^`, `=`, `@`).
    """
    lookups = [field.lstrip("^=@") for field in search_fields]
    labels = [
        "saga id" if lookup == "id" else lookup.split("__")[-1].replace("_", " ")
        for lookup in lookups
    ]
    if not labels:
        return f"Search by {whole}." if whole else ""
    listed = f"{', '.join(labels[:-1])} or {labels[-1]}" if len(labels) > 1 else labels[0]
    return f"Search by {listed} (or a part of one)" + (f", or by {whole}." if whole else ".")
