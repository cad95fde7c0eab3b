"""Bulk actions in the admin: retry or compensate every saga that matches the list's filters,
or mark a stage of each as done.

The saga list links to a page that starts from the list's current filters, previews what each
action the operator may take would do (how many sagas match; their plans, in groups, from
`services.bulk_action_preview`; a skip's once its stage is named) and starts one on
confirmation (`services.bulk_action_start`). A bulk action's own page then shows its progress,
and the sagas it skipped and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, QueryDict
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import urlencode
from django.utils.safestring import SafeString

from .. import services
from ..bulk import BulkFilter, BulkPreview, BulkSkip, sagas_have_business_key
from ..exceptions import BulkActionRefused
from ..models import BulkAction, BulkOperation, BulkOutcome, SagaStatus
from ..permissions import may_operate
from .actions import ACTION_WORDS, ActionWords, OperatorActionsAdmin
from .display import EMPTY, pretty_json, status_badge, timestamp
from .readonly import ReadOnlyAdminMixin
from .skip import SkipForm

# The saga list's filters that are a bulk filter's fields; the list's order and page are not
# filters. Anything else it has (its search) is not a bulk filter, and the page says so.
CHANGELIST_FILTERS = {
    "status__exact": "status",
    "name": "name",
    "created_at__gte": "created_from",
    "created_at__lt": "created_before",
}
DATE_HIERARCHY = ("created_at__year", "created_at__month", "created_at__day")
LIST_ONLY = {"o", "p", "all", "e"}

# Skipped or failed sagas listed on a bulk action's page (the API lists them all).
LISTED = 500
# The section of a bulk skip's page: the stage it marks as done, the output, the note.
MARKED_AS_DONE = "Stage marked as done"


class BulkFilterForm(forms.Form):
    """A bulk filter (`sagas.bulk.BulkFilter`): every field given must match."""

    status = forms.ChoiceField(choices=[("", "any"), *SagaStatus.choices], required=False)
    name = forms.CharField(label="Saga name", max_length=100, required=False)
    error_code = forms.CharField(max_length=100, required=False)
    failed_step = forms.CharField(
        label="Stopped at step",
        max_length=100,
        required=False,
        help_text="The step that failed (or whose compensation did), or the one in progress.",
    )
    created_from = forms.DateTimeField(required=False, help_text="At or after.")
    created_before = forms.DateTimeField(required=False)
    updated_from = forms.DateTimeField(label="Last update from", required=False)
    updated_before = forms.DateTimeField(label="Last update before", required=False)
    business_key = forms.CharField(max_length=200, required=False)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not sagas_have_business_key():
            del self.fields["business_key"]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if not self.errors:
            for field, text in self.bulk_filter().problems().items():
                self.add_error(field if field in self.fields else None, text)
        return cleaned

    def bulk_filter(self) -> BulkFilter:
        return BulkFilter(**self.cleaned_data)


class BulkSkipForm(SkipForm):
    """What a bulk skip marks as done: the stage of this name in each saga, with one output
    (the page's fields `skip-stage`, `skip-output`, `skip-note`)."""

    prefix = "skip"
    stage = forms.CharField(
        max_length=100,
        required=False,
        help_text="To mark a stage as done in every matching saga: its name (such as "
        "payment_confirmation), or a group's failed member as <group>.<member> (such as "
        "prepare.book_carrier).",
    )
    field_order = ("stage", "output", "note")

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if not self.errors and cleaned.get("stage"):
            for field, text in self.bulk_skip().problems().items():
                self.add_error(field if field in self.fields else None, text)
        return cleaned

    def bulk_skip(self) -> BulkSkip:
        data = self.cleaned_data
        return BulkSkip(data["stage"], data["output"], data["note"])


def changelist_filter_data(params: QueryDict) -> tuple[dict[str, str], list[str]]:
    """The saga list's filters as a bulk filter form's data, and those that are not a bulk
    filter's (as `name=value`), which the page names as left out."""
    data = {field: value for key, field in CHANGELIST_FILTERS.items() if (value := params.get(key))}
    hierarchy = _date_range(*(params.get(key) for key in DATE_HIERARCHY))
    if hierarchy and not {"created_from", "created_before"} & set(data):
        data["created_from"], data["created_before"] = (str(moment) for moment in hierarchy)
    understood = {*CHANGELIST_FILTERS, *LIST_ONLY, *(DATE_HIERARCHY if hierarchy else ())}
    left_out = [f"{key}={params.get(key)}" for key in params if key not in understood]
    return data, left_out


def _date_range(
    year: str | None, month: str | None, day: str | None
) -> tuple[datetime, datetime] | None:
    """The created-at range of the list's date hierarchy (a year, a month or a day), in the
    current time zone as the list has it."""
    if not year:
        return None
    try:
        start = datetime(int(year), int(month or 1), int(day or 1))
        if day:
            end = start + timedelta(days=1)
        elif month:
            end = datetime(start.year + start.month // 12, start.month % 12 + 1, 1)
        else:
            end = datetime(start.year + 1, 1, 1)
    except (TypeError, ValueError, OverflowError):
        return None
    return timezone.make_aware(start), timezone.make_aware(end)


@dataclass(frozen=True)
class BulkPreviewSection:
    """One action's part of the bulk page: its words and its preview."""

    action: str
    words: ActionWords
    preview: BulkPreview
    stage: str = ""  # a skip's

    @property
    def button(self) -> str:
        """`Retry 3 sagas`, `Mark payment as done in 3 sagas`."""
        count = self.preview.allowed
        sagas = f"{count} saga{'' if count == 1 else 's'}"
        if self.action == BulkOperation.SKIP:
            return f"Mark {self.stage} as done in {sagas}"
        return f"{self.words.verb} {sagas}"


class SagaBulkActionsMixin(OperatorActionsAdmin):
    """The saga admin's bulk page, linked from its list, for operators with an action's
    permission (`sagas.retry_saga`, `sagas.compensate_saga`)."""

    def get_urls(self) -> list[URLPattern]:
        bulk = path("bulk/", self.admin_site.admin_view(self.bulk_view), name="sagas_saga_bulk")
        return [bulk, *super().get_urls()]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        if self._bulk_operations(request):
            url = reverse("admin:sagas_saga_bulk")
            query = request.GET.urlencode()
            extra_context = {**(extra_context or {}), "saga_bulk_url": f"{url}?{query}"}
        return super().changelist_view(request, extra_context)

    @staticmethod
    def _bulk_operations(request: HttpRequest) -> list[str]:
        return [action for action in BulkOperation.values if may_operate(request.user, action)]

    def bulk_view(self, request: HttpRequest) -> HttpResponse:
        operations = self._bulk_operations(request)
        if not operations:
            raise PermissionDenied
        if request.method == "POST":
            return self._bulk_start(request, operations)
        left_out: list[str] = []
        skip_form = None
        if "_preview" in request.GET:
            form = BulkFilterForm(request.GET)
            if BulkOperation.SKIP in operations:
                skip_form = BulkSkipForm(request.GET)
        else:
            data, left_out = changelist_filter_data(request.GET)
            form = BulkFilterForm(data)
        previews: list[BulkPreviewSection] = []
        refused = ""
        if form.is_valid():
            try:
                previews = [
                    section
                    for operation in operations
                    if (section := self._section(operation, form.bulk_filter(), skip_form))
                ]
            except BulkActionRefused as exc:
                refused = str(exc)
        if skip_form is None and BulkOperation.SKIP in operations:
            skip_form = BulkSkipForm()
        context = {
            **self.admin_site.each_context(request),
            "title": "Retry or compensate every matching saga",
            "opts": self.model._meta,
            "form": form,
            "skip_form": skip_form,
            "previews": previews,
            "refused": refused,
            "left_out": left_out,
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/bulk_action.html", context)

    @staticmethod
    def _section(
        operation: str, bulk_filter: BulkFilter, skip_form: BulkSkipForm | None
    ) -> BulkPreviewSection | None:
        """One action's preview; a skip's only once its stage is named (and its form valid)."""
        skip = None
        if operation == BulkOperation.SKIP:
            if skip_form is None or not skip_form.is_valid() or not skip_form.cleaned_data["stage"]:
                return None
            skip = skip_form.bulk_skip()
        preview = services.bulk_action_preview(action=operation, bulk_filter=bulk_filter, skip=skip)
        stage = skip.stage if skip is not None else ""
        return BulkPreviewSection(operation, ACTION_WORDS[operation], preview, stage)

    def _bulk_start(self, request: HttpRequest, operations: list[str]) -> HttpResponse:
        operation = request.POST.get("action", "")
        if operation not in operations:
            raise PermissionDenied
        form = BulkFilterForm(request.POST)
        skip_form = BulkSkipForm(request.POST)
        fields = [*form.fields, *(skip_form.add_prefix(name) for name in skip_form.fields)]
        again = (
            reverse("admin:sagas_saga_bulk")
            + "?"
            + urlencode({**{key: request.POST.get(key, "") for key in fields}, "_preview": "1"})
        )
        skipping = operation == BulkOperation.SKIP
        if not form.is_valid():
            self.message_user(request, "The filter is not valid: preview it again.", messages.ERROR)
            return HttpResponseRedirect(again)
        if skipping and not skip_form.is_valid():
            self.message_user(
                request, "The stage or its output is not valid: preview it again.", messages.ERROR
            )
            return HttpResponseRedirect(again)
        try:
            bulk_action = services.bulk_action_start(
                action=operation,
                bulk_filter=form.bulk_filter(),
                actor=request.user.get_username(),
                created_by=request.user,
                expected_count=_int_or_none(request.POST.get("expected_count")),
                skip=skip_form.bulk_skip() if skipping else None,
            )
        except BulkActionRefused as exc:  # or BulkPreviewOutdated
            self.message_user(request, str(exc), messages.ERROR)
            return HttpResponseRedirect(again)
        noun = "saga" if bulk_action.total == 1 else "sagas"
        self.message_user(
            request,
            f"Bulk {operation} {bulk_action.pk} started on {bulk_action.total} {noun}.",
            messages.SUCCESS,
        )
        return HttpResponseRedirect(reverse("admin:sagas_bulkaction_change", args=[bulk_action.pk]))


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value else None
    except ValueError:
        return None


class BulkActionAdmin(ReadOnlyAdminMixin, admin.ModelAdmin):
    """Bulk actions and their progress; the page of one refreshes itself until it is done."""

    change_form_template = "admin/sagas/bulkaction/change_form.html"
    list_display = ("__str__", "action", "status_badge", "progress", "actor", "created")
    list_filter = ("status", "action")
    ordering = ("-created_at",)
    fieldsets = (
        (
            None,
            {
                "fields": (
                    ("action", "status_badge"),
                    "progress",
                    "filter_text",
                    "actor",
                    ("created", "started", "finished"),
                )
            },
        ),
        (MARKED_AS_DONE, {"fields": ("stage", "output_json", "note")}),
        ("Skipped sagas", {"fields": ("skipped_sagas",)}),
        ("Failed sagas", {"fields": ("failed_sagas",)}),
    )
    readonly_fields = (
        "action",
        "status_badge",
        "progress",
        "filter_text",
        "actor",
        "created",
        "started",
        "finished",
        "stage",
        "output_json",
        "note",
        "skipped_sagas",
        "failed_sagas",
    )

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is not None and obj.action == BulkOperation.SKIP:
            return fieldsets
        return [fieldset for fieldset in fieldsets if fieldset[0] != MARKED_AS_DONE]

    class Media:
        css = {"all": ("sagas/admin.css",)}

    # The operator who starts a bulk action follows its progress without the model's view
    # permission.
    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        operates = any(may_operate(request.user, action) for action in BulkOperation.values)
        return operates or super().has_view_permission(request, obj)

    @admin.display(description="status", ordering="status")
    def status_badge(self, bulk_action: BulkAction) -> SafeString:
        return status_badge(bulk_action.status, bulk_action.get_status_display())

    @admin.display(description="progress")
    def progress(self, bulk_action: BulkAction) -> SafeString:
        return format_html(
            '<progress class="saga-bulk-progress" value="{}" max="{}"></progress> '
            '<span class="saga-bulk-counts">{} of {}: {} done, {} skipped, {} failed</span>',
            bulk_action.processed,
            bulk_action.total,
            bulk_action.processed,
            bulk_action.total,
            bulk_action.done,
            bulk_action.skipped,
            bulk_action.failed,
        )

    @admin.display(description="output")
    def output_json(self, bulk_action: BulkAction) -> SafeString:
        return pretty_json(bulk_action.output)

    @admin.display(description="filter")
    def filter_text(self, bulk_action: BulkAction) -> str:
        return BulkFilter.from_json(bulk_action.filter).describe()

    @admin.display(description="created", ordering="created_at")
    def created(self, bulk_action: BulkAction) -> str:
        return timestamp(bulk_action.created_at)

    @admin.display(description="started")
    def started(self, bulk_action: BulkAction) -> str:
        return timestamp(bulk_action.started_at)

    @admin.display(description="finished")
    def finished(self, bulk_action: BulkAction) -> str:
        return timestamp(bulk_action.finished_at)

    @admin.display(description="skipped")
    def skipped_sagas(self, bulk_action: BulkAction) -> SafeString | str:
        return _saga_list(bulk_action, BulkOutcome.SKIPPED)

    @admin.display(description="failed")
    def failed_sagas(self, bulk_action: BulkAction) -> SafeString | str:
        return _saga_list(bulk_action, BulkOutcome.FAILED)


def _saga_list(bulk_action: BulkAction, outcome: str) -> SafeString | str:
    items = list(bulk_action.items.filter(outcome=outcome).order_by("id")[: LISTED + 1])
    if not items:
        return EMPTY
    rows = format_html_join(
        "",
        '<li><a class="saga-id" href="{}">{}</a> {}</li>',
        (
            (reverse("admin:sagas_saga_change", args=[item.saga_id]), item.saga_id, item.reason)
            for item in items[:LISTED]
        ),
    )
    more = f"The first {LISTED} are listed; the API lists them all." if len(items) > LISTED else ""
    return format_html('<ul class="saga-bulk-sagas">{}</ul>{}', rows, more)
