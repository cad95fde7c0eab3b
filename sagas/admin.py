"""Admin for sagas: status at a glance, the steps and timeline of each, and the operator actions.

Everything here is read-only. The operator actions (retry, compensate, resolve) preview what
they will do through `services.saga_plan` on a confirmation page, then call the matching service;
the admin holds no saga logic of its own. Links to the domain objects of a saga come from a hook
named by the `SAGAS_ADMIN_LINKS` setting, so this app never imports a domain app.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.db.models import Prefetch, QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.module_loading import import_string
from django.utils.safestring import SafeString, mark_safe

from . import services
from .engine import Plan
from .exceptions import InvalidTransition
from .models import Saga, SagaEvent, SagaStatus, SagaStep, StepStatus
from .permissions import may_operate

EMPTY = "—"

# Colours of the status badges: the saga's and its steps' statuses share one palette.
STATUS_COLOURS: dict[str, str] = {
    SagaStatus.PENDING: "#6b7280",
    SagaStatus.RUNNING: "#1d6fd8",
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


def step_duration(step: SagaStep) -> timedelta | None:
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


def pretty_json(value: Any) -> SafeString:
    return format_html('<pre class="saga-json">{}</pre>', json.dumps(value, indent=2, default=str))


def admin_links(saga: Saga) -> list[tuple[str, str]]:
    """(label, url) pairs for the domain objects of a saga, from the `SAGAS_ADMIN_LINKS` hook."""
    hook = getattr(settings, "SAGAS_ADMIN_LINKS", None)
    if not hook:
        return []
    function: Callable[[Saga], Iterable[tuple[str, str]]] = import_string(hook)
    return list(function(saga))


def has_saga_permission(request: HttpRequest, action: str) -> bool:
    return may_operate(request.user, action)


# -- the step diagram -----------------------------------------------------------------------------

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
    if detail.get("worker"):
        parts.append(f"on {detail['worker']}")
    parts.extend(f"{key}: {value}" for key, value in detail.items() if key not in SHOWN_DETAILS)
    return " · ".join(parts)


# -- inlines ------------------------------------------------------------------------------------


class ReadOnlyInline(admin.TabularInline):
    """Rows of a saga, shown to whoever may view the saga; never added, changed or deleted."""

    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return has_saga_permission(request, "view") or has_saga_permission(request, "change")


class SagaStepInline(ReadOnlyInline):
    model = SagaStep
    verbose_name_plural = "steps"
    fields = (
        "position",
        "name",
        "status_badge",
        "tries",
        "error",
        "started",
        "duration",
        "compensated",
    )
    readonly_fields = fields
    ordering = ("index",)

    @admin.display(description="#")
    def position(self, step: SagaStep) -> int:
        return step.index + 1

    @admin.display(description="status")
    def status_badge(self, step: SagaStep) -> SafeString:
        return status_badge(step.status, step.get_status_display())

    @admin.display(description="error")
    def error(self, step: SagaStep) -> str:
        if not step.error_code:
            return EMPTY
        return f"{step.error_code}: {step.error_message}"

    @admin.display(description="attempts (undo)")
    def tries(self, step: SagaStep) -> str:
        if step.compensation_attempts:
            return f"{step.attempts} ({step.compensation_attempts})"
        return str(step.attempts)

    @admin.display(description="started")
    def started(self, step: SagaStep) -> str:
        return clock(step.started_at)

    @admin.display(description="duration")
    def duration(self, step: SagaStep) -> str:
        return duration_text(step_duration(step))

    @admin.display(description="compensated")
    def compensated(self, step: SagaStep) -> str:
        return clock(step.compensated_at)


class SagaEventInline(ReadOnlyInline):
    model = SagaEvent
    verbose_name = "event"
    verbose_name_plural = "timeline"
    fields = ("time", "since_start", "step", "what", "details")
    readonly_fields = fields
    ordering = ("id",)

    def get_queryset(self, request: HttpRequest) -> QuerySet[SagaEvent]:
        return super().get_queryset(request).select_related("saga")

    @admin.display(description="time")
    def time(self, event: SagaEvent) -> str:
        return clock(event.created_at)

    @admin.display(description="since start")
    def since_start(self, event: SagaEvent) -> str:
        return "+" + duration_text(event.created_at - event.saga.created_at)

    @admin.display(description="step")
    def step(self, event: SagaEvent) -> str:
        return event.step_name or EMPTY

    @admin.display(description="event")
    def what(self, event: SagaEvent) -> SafeString:
        tone = EVENT_TONES.get(event.kind, "info")
        return format_html(
            '<span class="saga-event saga-event-{}">{}</span>', tone, event.get_kind_display()
        )

    @admin.display(description="details")
    def details(self, event: SagaEvent) -> str:
        return event_detail_text(event.detail or {}) or EMPTY


# -- the saga admin -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OperatorAction:
    """One operator action: its admin action's name and the words for it on the pages."""

    name: str
    verb: str
    done: str
    explanation: str


OPERATOR_ACTIONS: dict[str, OperatorAction] = {
    "retry": OperatorAction(
        "retry_sagas",
        "Retry",
        "Retried",
        "Retrying resumes a failed saga where it stopped: steps that completed are not run "
        "again. A saga that failed while compensating resumes its compensation.",
    ),
    "compensate": OperatorAction(
        "compensate_sagas",
        "Compensate",
        "Compensating",
        "Compensating aborts the saga and undoes its completed steps, in reverse order.",
    ),
    "resolve": OperatorAction(
        "resolve_sagas",
        "Resolve",
        "Resolved",
        "Resolving marks the step whose compensation failed as compensated by hand (you "
        "undid its effect yourself); the remaining compensations then run.",
    ),
}


@dataclass(frozen=True)
class Preview:
    """What an action will do to one saga, for the confirmation page."""

    saga: Saga
    plan: Plan

    @property
    def status_badge(self) -> SafeString:
        return status_badge(self.saga.status, self.saga.get_status_display())


@admin.register(Saga)
class SagaAdmin(admin.ModelAdmin):
    change_form_template = "admin/sagas/saga/change_form.html"
    list_display = (
        "short_id",
        "name",
        "status_badge",
        "progress",
        "current_step_name",
        "attempts",
        "created",
        "duration",
    )
    list_display_links = ("short_id",)
    list_filter = ("status", "name", "created_at")
    date_hierarchy = "created_at"
    search_fields = ("id", "input__order_id")
    search_help_text = "Search by saga id or order id (or the start of either)."
    ordering = ("-created_at",)
    list_per_page = 50
    show_full_result_count = False
    actions = ("retry_sagas", "compensate_sagas", "resolve_sagas")
    inlines = (SagaStepInline, SagaEventInline)
    fieldsets = (
        (
            None,
            {
                "classes": ("saga-summary",),
                "fields": (
                    ("id", "name"),
                    ("status_badge", "progress"),
                    ("current_step_name", "attempts"),
                    "error",
                    ("created", "finished", "duration"),
                ),
            },
        ),
        ("Steps, forward and compensation", {"classes": ("saga-flow",), "fields": ("diagram",)}),
        ("Related objects", {"classes": ("saga-related",), "fields": ("related_objects",)}),
        (
            "Input and bookkeeping",
            {
                "classes": ("collapse",),
                "fields": (
                    "input_json",
                    "options_json",
                    "idempotency_key",
                    "created_by",
                    "deadline",
                    "recovery_attempts",
                    "updated_at",
                ),
            },
        ),
    )
    readonly_fields = (
        "id",
        "name",
        "status_badge",
        "progress",
        "current_step_name",
        "attempts",
        "error",
        "created",
        "finished",
        "duration",
        "updated_at",
        "diagram",
        "related_objects",
        "input_json",
        "options_json",
        "idempotency_key",
        "created_by",
        "deadline",
        "recovery_attempts",
    )

    class Media:
        css = {"all": ("sagas/admin.css",)}

    def get_queryset(self, request: HttpRequest) -> QuerySet[Saga]:
        # One query for the steps of every saga on the page: the list costs the same number
        # of queries for one saga or a hundred.
        steps = SagaStep.objects.order_by("index").defer("definition", "output")
        return super().get_queryset(request).prefetch_related(Prefetch("steps", queryset=steps))

    # Sagas change only through the engine: the admin shows them and offers operator actions.
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Only a superuser, and never a saga in flight: its workers would find no rows.
        if not request.user.is_superuser:
            return False
        return obj is None or obj.is_final

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return has_saga_permission(request, "retry")

    def has_compensate_permission(self, request: HttpRequest) -> bool:
        return has_saga_permission(request, "compensate")

    def has_resolve_permission(self, request: HttpRequest) -> bool:
        return has_saga_permission(request, "resolve")

    # -- columns and fields ----------------------------------------------------------------

    @staticmethod
    def _steps(saga: Saga) -> list[SagaStep]:
        return list(saga.steps.all())  # prefetched by get_queryset

    def _current_step(self, saga: Saga) -> SagaStep | None:
        steps = self._steps(saga)
        if saga.status == SagaStatus.COMPLETED or not steps:
            return None
        if saga.status == SagaStatus.COMPENSATED:
            # The furthest step the saga reached: the one that failed, or was running when an
            # operator aborted it.
            return next((s for s in reversed(steps) if s.started_at is not None), None)
        return steps[min(saga.current_step, len(steps) - 1)]

    @admin.display(description="saga id", ordering="id")
    def short_id(self, saga: Saga) -> SafeString:
        return format_html('<span class="saga-id" title="{}">{}</span>', saga.pk, str(saga.pk)[:8])

    @admin.display(description="status", ordering="status")
    def status_badge(self, saga: Saga) -> SafeString:
        return status_badge(saga.status, saga.get_status_display())

    @admin.display(description="progress")
    def progress(self, saga: Saga) -> SafeString:
        steps = self._steps(saga)
        done = sum(1 for step in steps if step.status == StepStatus.COMPLETED)
        undone = sum(1 for step in steps if step.status == StepStatus.COMPENSATED)
        segments = format_html_join(
            "",
            '<span class="saga-segment" style="background-color: {}" title="{}: {}"></span>',
            (
                (
                    STATUS_COLOURS.get(step.status, "transparent"),
                    step.name,
                    step.get_status_display(),
                )
                for step in steps
            ),
        )
        text = f"{done} of {len(steps)}" + (f", {undone} undone" if undone else "")
        return format_html(
            '<span class="saga-progress">{}</span> <span class="saga-progress-text">{}</span>',
            segments,
            text,
        )

    @admin.display(description="step", ordering="current_step")
    def current_step_name(self, saga: Saga) -> str:
        step = self._current_step(saga)
        return step.name if step is not None else EMPTY

    @admin.display(description="attempts")
    def attempts(self, saga: Saga) -> str:
        step = self._current_step(saga)
        if step is None:
            return EMPTY
        if step.status in (StepStatus.COMPENSATING, StepStatus.COMPENSATION_FAILED):
            return f"{step.compensation_attempts} (undo)"
        return str(step.attempts)

    @admin.display(description="created", ordering="created_at")
    def created(self, saga: Saga) -> str:
        return timestamp(saga.created_at)

    @admin.display(description="finished", ordering="finished_at")
    def finished(self, saga: Saga) -> str:
        return timestamp(saga.finished_at)

    @admin.display(description="deadline")
    def deadline(self, saga: Saga) -> str:
        return timestamp(saga.deadline_at)

    @admin.display(description="duration")
    def duration(self, saga: Saga) -> str:
        end = saga.finished_at or timezone.now()
        return duration_text(end - saga.created_at)

    @admin.display(description="error")
    def error(self, saga: Saga) -> str:
        if not saga.error_code:
            return EMPTY
        return f"{saga.error_code}: {saga.error_message}"

    @admin.display(description="steps")
    def diagram(self, saga: Saga) -> SafeString:
        return step_diagram(self._steps(saga))

    @admin.display(description="links")
    def related_objects(self, saga: Saga) -> SafeString | str:
        links = admin_links(saga)
        if not links:
            return EMPTY
        return format_html(
            '<ul class="saga-links">{}</ul>',
            format_html_join("", '<li><a href="{}">{}</a></li>', ((u, t) for t, u in links)),
        )

    @admin.display(description="input")
    def input_json(self, saga: Saga) -> SafeString:
        return pretty_json(saga.input)

    @admin.display(description="options")
    def options_json(self, saga: Saga) -> SafeString:
        return pretty_json(saga.options)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if getattr(settings, "SAGAS_ADMIN_LINKS", None):
            return fieldsets
        return [fieldset for fieldset in fieldsets if fieldset[0] != "Related objects"]

    # -- the detail page's action buttons ---------------------------------------------------

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> HttpResponse:
        if obj is not None:
            context["saga_operator_actions"] = self._buttons(request, obj)
            context["saga_changelist_url"] = reverse("admin:sagas_saga_changelist")
        return super().render_change_form(request, context, add, change, form_url, obj)

    def _buttons(self, request: HttpRequest, saga: Saga) -> list[OperatorAction]:
        """The actions this user may take on a saga that is not finished.

        Whether an action applies is for its confirmation page to say (from `saga_plan`): a
        plan locks the saga row, which a page view should not wait for while a step runs.
        """
        if saga.is_final:
            return []
        stuck = any(s.status == StepStatus.COMPENSATION_FAILED for s in self._steps(saga))
        return [
            operator_action
            for action, operator_action in OPERATOR_ACTIONS.items()
            if has_saga_permission(request, action) and (action != "resolve" or stuck)
        ]

    # -- the operator actions ---------------------------------------------------------------

    @admin.action(description="Retry the selected sagas", permissions=["retry"])
    def retry_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, "retry")

    @admin.action(description="Compensate (abort) the selected sagas", permissions=["compensate"])
    def compensate_sagas(
        self, request: HttpRequest, queryset: QuerySet[Saga]
    ) -> HttpResponse | None:
        return self._operate(request, queryset, "compensate")

    @admin.action(
        description="Resolve the failed compensation of the selected sagas",
        permissions=["resolve"],
    )
    def resolve_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, "resolve")

    @staticmethod
    def _resolve_index(saga: Saga) -> int:
        """The step to resolve: the first whose compensation failed, in compensation order.

        Resolving it restarts the compensation, which retries any other failed one.
        """
        failed = [s.index for s in saga.steps.all() if s.status == StepStatus.COMPENSATION_FAILED]
        return max(failed, default=saga.current_step)

    def _plan(self, saga: Saga, action: str) -> Plan:
        index = self._resolve_index(saga) if action == "resolve" else None
        return services.saga_plan(saga_id=saga.pk, action=action, index=index)

    def _act(self, saga: Saga, action: str, actor: str) -> Plan:
        if action == "retry":
            return services.saga_retry(saga_id=saga.pk, actor=actor)
        if action == "compensate":
            return services.saga_compensate(saga_id=saga.pk, actor=actor)
        index = self._resolve_index(saga)
        return services.saga_step_resolve(saga_id=saga.pk, index=index, actor=actor)

    def _operate(
        self, request: HttpRequest, queryset: QuerySet[Saga], action: str
    ) -> HttpResponse | None:
        sagas = list(queryset.order_by("-created_at"))
        if request.POST.get("post") != "yes":
            return self._confirmation(request, sagas, action)
        operator_action = OPERATOR_ACTIONS[action]
        actor = request.user.get_username()
        done = 0
        for saga in sagas:
            try:
                plan = self._act(saga, action, actor)
            except (InvalidTransition, Saga.DoesNotExist) as error:
                self.message_user(
                    request, f"Saga {saga.pk} was not changed: {error}", messages.ERROR
                )
                continue
            done += 1
            self.log_change(request, saga, f"{operator_action.done} by an operator: {plan.reason}")
        if done:
            noun = "saga" if done == 1 else "sagas"
            self.message_user(request, f"{operator_action.done} {done} {noun}.", messages.SUCCESS)
        if request.POST.get("_return_to_detail") and len(sagas) == 1:
            return HttpResponseRedirect(reverse("admin:sagas_saga_change", args=[sagas[0].pk]))
        return None  # back to the list, with its filters

    def _confirmation(self, request: HttpRequest, sagas: list[Saga], action: str) -> HttpResponse:
        previews = []
        for saga in sagas:
            try:
                plan = self._plan(saga, action)
            except Saga.DoesNotExist:
                plan = Plan(action, False, "The saga no longer exists.")
            previews.append(Preview(saga, plan))
        operator_action = OPERATOR_ACTIONS[action]
        context = {
            **self.admin_site.each_context(request),
            "title": f"{operator_action.verb} sagas: are you sure?",
            "opts": self.model._meta,
            "operator_action": operator_action,
            "previews": previews,
            "allowed_count": sum(1 for preview in previews if preview.plan.allowed),
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "return_to_detail": bool(request.POST.get("_return_to_detail")),
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/action_confirmation.html", context)
