"""The saga admin: the list of sagas and a saga's page, with its steps and its timeline.

Everything here is read-only: sagas change through the engine only. The operator actions come
from `actions.OperatorActionsAdmin`, and their bulk page from `bulk.SagaBulkActionsMixin`; what
a waiting saga waits for, and the page that sends it a signal, from `waits`; the page that marks
a stage as done from `skip`; the pieces of the page from `display`, `diagram` and `links`.
"""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin
from django.contrib.admin.views.main import PAGE_VAR, ChangeList
from django.db import connection
from django.db.models import Prefetch, Q, QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from .. import conf
from ..definitions import MAX_CHILD_DEPTH
from ..models import (
    Reconciliation,
    Saga,
    SagaEvent,
    SagaMember,
    SagaStatus,
    SagaStep,
    StepStatus,
)
from ..paginators import BoundedPaginator
from ..permissions import may_operate
from .bulk import SagaBulkActionsMixin
from .diagram import step_diagram
from .display import (
    EMPTY,
    EVENT_TONES,
    STATUS_COLOURS,
    clock,
    duration_text,
    error_text,
    event_detail_text,
    pretty_json,
    search_help_text,
    status_badge,
    step_duration,
    timestamp,
)
from .links import admin_links, link_list
from .readonly import ReadOnlyAdminMixin
from .skip import SagaSkipAdmin
from .waits import SagaSignalAdmin, steps_for_pages, waiting_column, waiting_section


class SagaRowsInline(ReadOnlyAdminMixin, admin.TabularInline):
    """Rows of a saga, shown to whoever may view the saga; never added, changed or deleted."""

    extra = 0
    can_delete = False
    show_change_link = False

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return may_operate(request.user, "view") or may_operate(request.user, "change")


class StageRowColumns:
    """The columns a stage's row and a group member's row show alike in their inlines."""

    columns = ("status_badge", "tries", "error", "started", "duration", "compensated")

    @admin.display(description="status")
    def status_badge(self, step: SagaStep | SagaMember) -> SafeString:
        return status_badge(step.status, step.get_status_display())

    @admin.display(description="error")
    def error(self, step: SagaStep | SagaMember) -> str:
        return error_text(step.error_code, step.error_message)

    @admin.display(description="attempts (undo)")
    def tries(self, step: SagaStep | SagaMember) -> str:
        if step.compensation_attempts:
            return f"{step.attempts} ({step.compensation_attempts})"
        return str(step.attempts)

    @admin.display(description="started")
    def started(self, step: SagaStep | SagaMember) -> str:
        return clock(step.started_at)

    @admin.display(description="duration")
    def duration(self, step: SagaStep | SagaMember) -> str:
        return duration_text(step_duration(step))

    @admin.display(description="compensated")
    def compensated(self, step: SagaStep | SagaMember) -> str:
        return clock(step.compensated_at)


def _children_tree(saga_id: Any, *, depth: int) -> SafeString:
    """A saga's children and theirs, as nested lists of links (children nest a few deep at most:
    `sagas.definitions.MAX_CHILD_DEPTH`)."""
    children = list(
        Saga.objects.filter(parent_id=saga_id)
        .order_by("created_at")
        .only("id", "name", "status", "parent_stage", "parent_member")
    )
    if not children or depth > MAX_CHILD_DEPTH:
        return SafeString("")
    names = _member_names(saga_id) if any(c.parent_member is not None for c in children) else {}
    items = format_html_join(
        "",
        '<li><a href="{}">{} {}</a> {} ({}){}</li>',
        (
            (
                reverse("admin:sagas_saga_change", args=[child.pk]),
                child.name,
                str(child.pk)[:8],
                status_badge(child.status, child.get_status_display()),
                _started_by(child, names),
                _children_tree(child.pk, depth=depth + 1),
            )
            for child in children
        ),
    )
    return format_html('<ul class="saga-children">{}</ul>', items)


def _member_names(saga_id: Any) -> dict[tuple[int, int], str]:
    """The `<group>.<member>` names of a saga's group members, by (stage, position)."""
    groups = dict(SagaStep.objects.filter(saga_id=saga_id).values_list("index", "name"))
    return {
        (stage, position): f"{groups.get(stage, stage)}.{name}"
        for stage, position, name in SagaMember.objects.filter(saga_id=saga_id).values_list(
            "stage", "position", "name"
        )
    }


def _started_by(child: Saga, names: dict[tuple[int, int], str]) -> str:
    """What of its parent started a child: its stage (numbered from 1), or its group's member."""
    stage = child.parent_stage or 0
    if child.parent_member is None:
        return f"stage {stage + 1}"
    return f"member {names.get((stage, child.parent_member), child.parent_member)}"


class SagaStepInline(StageRowColumns, SagaRowsInline):
    model = SagaStep
    verbose_name_plural = "steps"
    fields = ("position", "name", *StageRowColumns.columns)
    readonly_fields = fields
    ordering = ("index",)

    @admin.display(description="#")
    def position(self, step: SagaStep) -> int:
        return step.index + 1


class SagaMemberInline(StageRowColumns, SagaRowsInline):
    """The members of the saga's groups (shown only for a saga that has some)."""

    model = SagaMember
    verbose_name = "group member"
    verbose_name_plural = "group members"
    fields = ("group", "name", *StageRowColumns.columns)
    readonly_fields = fields
    ordering = ("stage", "position")

    @admin.display(description="group")
    def group(self, member: SagaMember) -> str:
        return f"{member.stage + 1}"


class SagaEventInline(SagaRowsInline):
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


class SagaNameFilter(admin.AllValuesFieldListFilter):
    """The sagas' names, as Django's filter lists them, but read from saga_name_status_idx one
    name at a time (a loose index scan: one index probe per name), not by `SELECT DISTINCT`
    over every saga."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        choices: Any = distinct_names()
        self.lookup_choices = choices


def distinct_names() -> list[str]:
    q = connection.ops.quote_name
    table, name = q(Saga._meta.db_table), q("name")
    with connection.cursor() as cursor:
        cursor.execute(
            f"WITH RECURSIVE names AS ((SELECT {name} FROM {table} ORDER BY {name} LIMIT 1) "
            f"UNION ALL SELECT (SELECT s.{name} FROM {table} s WHERE s.{name} > names.{name} "
            f"ORDER BY s.{name} LIMIT 1) FROM names WHERE names.{name} IS NOT NULL) "
            f"SELECT {name} FROM names WHERE {name} IS NOT NULL"
        )
        return [value for (value,) in cursor.fetchall()]


# The fewest hex digits of a saga id the search takes for its beginning: as many as the list
# shows. A shorter number (an order's, say) is business data, not a saga id.
ID_PREFIX_DIGITS = 8


def id_range(term: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """The saga ids that begin with `term` (a whole id or its beginning, of at least
    `ID_PREFIX_DIGITS` hex digits, as the list shows it, dashes where the id has them), as the
    first and last of a range; None if `term` is no such beginning."""
    text = term.lower()
    digits = text.replace("-", "")
    if not (ID_PREFIX_DIGITS <= len(digits) <= 32 and set(digits) <= set("0123456789abcdef")):
        return None
    first, last = uuid.UUID(digits.ljust(32, "0")), uuid.UUID(digits.ljust(32, "f"))
    return (first, last) if str(first).startswith(text) else None


class ProjectFieldsOnly:
    """The saga admin, as Django's search sees it: with the project's lookups only."""

    def __init__(self, model_admin: admin.ModelAdmin[Saga]) -> None:
        self._model_admin = model_admin

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        return conf.admin_search_fields()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model_admin, name)


class SagaAdmin(ReadOnlyAdminMixin, SagaSignalAdmin, SagaSkipAdmin, SagaBulkActionsMixin):
    change_form_template = "admin/sagas/saga/change_form.html"
    list_display = (
        "short_id",
        "name",
        "business_key",
        "status_badge",
        "progress",
        "current_step_name",
        "attempts",
        "waiting_for",
        "created",
        "duration",
    )
    list_display_links = ("short_id",)
    list_filter = ("status", ("name", SagaNameFilter), "reconciliation", "created_at")
    date_hierarchy = "created_at"
    # as get_search_results searches them (through indexes), with the business key, whole,
    # and the project's SAGAS_ADMIN_SEARCH_FIELDS
    search_fields = ("id", "name")
    ordering = ("-created_at",)
    list_per_page = 50
    # Neither the table's count nor the filtered list's: a count that stops past the page.
    show_full_result_count = False
    paginator = BoundedPaginator
    inlines = (SagaStepInline, SagaMemberInline, SagaEventInline)
    fieldsets = (
        (
            None,
            {
                "classes": ("saga-summary",),
                "fields": (
                    ("id", "name", "business_key"),
                    ("status_badge", "progress"),
                    ("current_step_name", "attempts"),
                    "error",
                    ("created", "finished", "duration"),
                ),
            },
        ),
        ("Waiting", {"classes": ("saga-waiting",), "fields": ("waiting_details",)}),
        ("Steps, forward and compensation", {"classes": ("saga-flow",), "fields": ("diagram",)}),
        ("Parent and children", {"classes": ("saga-family",), "fields": ("family",)}),
        (
            "Reconciliation",
            {"classes": ("saga-reconciliation",), "fields": ("reconciliation_details",)},
        ),
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
        "business_key",
        "status_badge",
        "progress",
        "current_step_name",
        "attempts",
        "error",
        "created",
        "finished",
        "duration",
        "updated_at",
        "waiting_details",
        "diagram",
        "family",
        "reconciliation_details",
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
        # One query for the steps of every saga on the page, with what a wait waits for: the
        # list costs the same number of queries for one saga or a hundred.
        steps = steps_for_pages()
        # And the members of their groups, in one more query (none for sagas without groups).
        members = SagaMember.objects.order_by("stage", "position").defer("output", "item")
        return (
            super()
            .get_queryset(request)
            .prefetch_related(Prefetch("steps", queryset=steps))
            .prefetch_related(Prefetch("members", queryset=members))
        )

    def get_inline_instances(self, request: HttpRequest, obj: Any = None) -> list[Any]:
        inlines = super().get_inline_instances(request, obj)
        if obj is None or not self._members(obj):
            inlines = [i for i in inlines if not isinstance(i, SagaMemberInline)]
        return inlines

    def get_paginator(
        self,
        request: HttpRequest,
        queryset: QuerySet[Saga],
        per_page: int,
        *args: Any,
        **kwargs: Any,
    ) -> BoundedPaginator:
        try:
            reach = int(request.GET.get(PAGE_VAR, 1))
        except ValueError:
            reach = 1
        return BoundedPaginator(queryset, per_page, *args, reach=reach, **kwargs)

    def get_search_fields(self, request: HttpRequest) -> tuple[str, ...]:
        return (*self.search_fields, *conf.admin_search_fields())

    def get_search_results(
        self, request: HttpRequest, queryset: QuerySet[Saga], search_term: str
    ) -> tuple[QuerySet[Saga], bool]:
        # Each through an index, on a table of millions: a key whole (saga_business_key_idx),
        # a saga id or its beginning of 8 hex digits or more (a range of the primary key; a
        # shorter number, such as an order's, matches business data only), a part of a name (the
        # names that hold it, read from saga_name_status_idx). The project's own lookups
        # (SAGAS_ADMIN_SEARCH_FIELDS) are searched as Django searches.
        term = search_term.strip()
        if not term:
            return queryset, False
        matches = Q(business_key=term)
        if ids := id_range(term):
            matches |= Q(pk__gte=ids[0], pk__lte=ids[1])
        if names := [name for name in distinct_names() if term.casefold() in name.casefold()]:
            matches |= Q(name__in=names)
        results, may_have_duplicates = queryset.filter(matches), False
        if conf.admin_search_fields():
            project: Any = ProjectFieldsOnly(self)
            found, may_have_duplicates = admin.ModelAdmin.get_search_results(
                project, request, queryset, search_term
            )
            results |= found
        return results, may_have_duplicates

    def get_changelist_instance(self, request: HttpRequest) -> ChangeList:
        changelist = super().get_changelist_instance(request)
        names = search_help_text(("name", *conf.admin_search_fields()), whole="key")
        changelist.search_help_text = names.replace(
            "Search by ", "Search by saga id (or its beginning), ", 1
        )
        return changelist

    # Sagas change only through the engine (ReadOnlyAdminMixin), but they may be cleaned up.
    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Only a superuser, and never a saga in flight: its workers would find no rows.
        if not request.user.is_superuser:
            return False
        return obj is None or obj.is_final

    # -- columns and fields ----------------------------------------------------------------

    @staticmethod
    def _steps(saga: Saga) -> list[SagaStep]:
        return list(saga.steps.all())  # prefetched by get_queryset

    @staticmethod
    def _members(saga: Saga) -> dict[int, list[SagaMember]]:
        """Its groups' members by stage (prefetched by get_queryset)."""
        by_stage: dict[int, list[SagaMember]] = {}
        for member in saga.members.all():
            by_stage.setdefault(member.stage, []).append(member)
        return by_stage

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
        badge = status_badge(saga.status, saga.get_status_display())
        if saga.reconciliation == Reconciliation.DISCREPANT:
            # Flagged by its reconciliation check: the world disagrees with its outcome.
            flag = format_html(
                '<span class="saga-discrepant" title="{}">discrepant</span>',
                "; ".join(d.get("message", "") for d in saga.discrepancies or []),
            )
            return format_html("{} {}", badge, flag)
        return badge

    @admin.display(description="reconciliation")
    def reconciliation_details(self, saga: Saga) -> SafeString:
        """What the last check found, each discrepancy with the repair it offers."""
        checked = clock(saga.reconciled_at) if saga.reconciled_at else "never"
        found = format_html_join(
            "",
            "<li><code>{}</code> {}{}</li>",
            (
                (
                    d.get("code", ""),
                    d.get("message", ""),
                    format_html(" (repair: run the compensation of {} again)", d["repair"]["step"])
                    if d.get("repair")
                    else "",
                )
                for d in saga.discrepancies or []
            ),
        )
        return format_html(
            "<p>{}: last checked {}.</p>{}",
            saga.get_reconciliation_display(),
            checked,
            format_html("<ul>{}</ul>", found) if saga.discrepancies else "",
        )

    @admin.display(description="progress")
    def progress(self, saga: Saga) -> SafeString:
        # A group counts as its members, each a segment of its own.
        members = self._members(saga)
        steps: list[Any] = []
        for step in self._steps(saga):
            steps += members.get(step.index, [step])
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

    @admin.display(description="waiting for / until")
    def waiting_for(self, saga: Saga) -> SafeString | str:
        return waiting_column(saga)

    @admin.display(description="wait")
    def waiting_details(self, saga: Saga) -> SafeString | str:
        return waiting_section(saga)

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
        return error_text(saga.error_code, saga.error_message)

    @admin.display(description="steps")
    def diagram(self, saga: Saga) -> SafeString:
        return step_diagram(self._steps(saga), self._members(saga))

    @admin.display(description="family")
    def family(self, saga: Saga) -> SafeString:
        """Its parent (a link), and the tree of its children below it, each a link to its page."""
        parent = ""
        if saga.parent_id is not None:
            link = reverse("admin:sagas_saga_change", args=[saga.parent_id])
            names = _member_names(saga.parent_id) if saga.parent_member is not None else {}
            parent = format_html(
                '<p>Child of <a href="{}">{}</a> (its {}).</p>',
                link,
                str(saga.parent_id)[:8],
                _started_by(saga, names),
            )
        return format_html("{}{}", parent, _children_tree(saga.pk, depth=0))

    @admin.display(description="links")
    def related_objects(self, saga: Saga) -> SafeString | str:
        links = admin_links(saga)
        return link_list(links) if links else EMPTY

    @admin.display(description="input")
    def input_json(self, saga: Saga) -> SafeString:
        return pretty_json(saga.input)

    @admin.display(description="options")
    def options_json(self, saga: Saga) -> SafeString:
        return pretty_json(saga.options)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        left_out: set[str] = set()
        if conf.admin_links_hook() is None:
            left_out.add("Related objects")
        if obj is None or obj.status != SagaStatus.WAITING:
            left_out.add("Waiting")
        if obj is None or (obj.parent_id is None and not obj.children.exists()):
            left_out.add("Parent and children")
        if obj is None or (obj.reconciled_at is None and not obj.discrepancies):
            left_out.add("Reconciliation")
        return [fieldset for fieldset in fieldsets if fieldset[0] not in left_out]
