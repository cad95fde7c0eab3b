"""Waits in the admin: what a waiting saga waits for, and since and until when (the list's
column, the saga page's section), the previews of an approval's decision and of a signal, and
the page that sends a signal (`SagaSignalAdmin`).

The facts come from the saga's stage rows as the page loaded them (`steps_for_pages`: one
query for the stages of every saga on a page, with the few keys of a wait's definition read in
PostgreSQL). A preview reads the rows as they are; the service, under the saga's lock, has the
last word.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.db.models.fields.json import KT
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.safestring import SafeString

from .. import services
from ..definitions import is_wait
from ..engine import Plan
from ..engine.waits import SignalOutcome, check_payload
from ..exceptions import SagaBusy, SignalError
from ..models import (
    Saga,
    SagaSignal,
    SagaStatus,
    SagaStep,
    SignalStatus,
    StepStatus,
    stage_definition,
)
from ..permissions import may_operate
from .display import EMPTY, duration_text, timestamp

# The operator actions that decide an approval, both under `sagas.approve_saga`.
APPROVE = "approve"
REJECT = "reject"
DECISIONS = (APPROVE, REJECT)
# The permission of sending a signal: `sagas.signal_saga`.
SIGNAL = "signal"

# The text area of a form's JSON (a signal's payload, the output of a stage marked as done).
JSON_TEXTAREA = {"rows": 8, "cols": 60, "class": "vLargeTextField"}

# The keys of a stage's definition that the pages show, read in PostgreSQL as `wait_<key>`.
WAIT_KEYS = ("kind", "event", "approval", "on_timeout")

ON_TIMEOUT_WORDS = {
    "compensate": "then the saga compensates",
    "pause": "then the saga pauses for an operator",
    "continue": "then the saga goes on",
}


def steps_for_pages() -> QuerySet[SagaStep]:
    """The stage rows the saga pages prefetch: without their definition and output (large),
    but with the keys of a wait's definition that the pages show."""
    keys: dict[str, Any] = {f"wait_{key}": KT(f"stage_definition__{key}") for key in WAIT_KEYS}
    return (
        SagaStep.objects.order_by("index")
        .defer("stored_definition", "output")
        .alias(stage_definition=stage_definition())
        .annotate(**keys)
    )


def _key(step: SagaStep, key: str) -> str:
    """A key of the stage's definition, as text: annotated (`steps_for_pages`), or read from
    the definition of a row loaded another way."""
    if f"wait_{key}" in step.__dict__:
        return step.__dict__[f"wait_{key}"] or ""
    value = step.definition.get(key)
    if value is None or value is False:
        return ""
    return "true" if value is True else str(value)


@dataclass(frozen=True)
class WaitFacts:
    """A wait stage of a saga, as the pages show it."""

    name: str
    event: str
    approval: bool
    on_timeout: str
    status: str
    started_at: datetime | None
    due_at: datetime | None

    @classmethod
    def of(cls, step: SagaStep) -> WaitFacts:
        return cls(
            name=step.name,
            event=_key(step, "event"),
            approval=_key(step, "approval") == "true",
            on_timeout=_key(step, "on_timeout"),
            status=step.status,
            started_at=step.started_at,
            due_at=step.due_at,
        )

    @property
    def kind(self) -> str:
        if self.approval:
            return "approval"
        return "event" if self.event else "timer"

    @property
    def what(self) -> str:
        """`approval review`, `event payment_confirmed`, `timer cooling_off`."""
        return f"{self.kind} {self.name if self.approval or not self.event else self.event}"

    @property
    def until(self) -> str:
        """Until when it waits: its due time, or what ends it without one."""
        if self.due_at is not None:
            return f"until {timestamp(self.due_at)}"
        if self.approval:
            return "until an operator decides"
        return "no timeout"

    @property
    def due(self) -> str:
        return timestamp(self.due_at)

    @property
    def since(self) -> str:
        return timestamp(self.started_at)

    @property
    def waited(self) -> str:
        """For how long it has waited."""
        if self.started_at is None:
            return EMPTY
        return duration_text(timezone.now() - self.started_at)

    @property
    def remaining(self) -> str:
        """`in 14 min 3 s`, or `due 2.0 s ago` (the wake ends it within seconds)."""
        if self.due_at is None:
            return ""
        left = self.due_at - timezone.now()
        if left.total_seconds() >= 0:
            return f"in {duration_text(left)}"
        return f"due {duration_text(-left)} ago"

    @property
    def then(self) -> str:
        return ON_TIMEOUT_WORDS.get(self.on_timeout, "") if self.due_at is not None else ""


def is_wait_row(step: SagaStep) -> bool:
    return _key(step, "kind") == "wait"


def waiting_stage(saga: Saga) -> WaitFacts | None:
    """The wait a waiting saga waits at, from its prefetched stages; None if it is not waiting."""
    if saga.status != SagaStatus.WAITING:
        return None
    for step in saga.steps.all():
        if step.status == StepStatus.WAITING and is_wait_row(step):
            return WaitFacts.of(step)
    return None


def waiting_column(saga: Saga) -> SafeString | str:
    """The list's column: what the saga waits for, and until when."""
    facts = waiting_stage(saga)
    if facts is None:
        return EMPTY
    return render_to_string("admin/sagas/saga/waiting_cell.html", {"wait": facts})


def waiting_section(saga: Saga) -> SafeString | str:
    """The saga page's section: what it waits for, since and until when, and what then."""
    facts = waiting_stage(saga)
    if facts is None:
        return EMPTY
    return render_to_string("admin/sagas/saga/waiting.html", {"wait": facts})


def signal_events(saga: Saga) -> list[str]:
    """The events of the saga's waits that a signal may end (approvals are decided instead)."""
    return [
        event
        for step in saga.steps.all()
        if is_wait_row(step) and (event := _key(step, "event")) and _key(step, "approval") != "true"
    ]


def waits_at_an_approval(saga: Saga) -> bool:
    facts = waiting_stage(saga)
    return facts is not None and facts.approval


# -- previews ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    status: str
    definition: dict[str, Any]


def _stages(saga_id: Any) -> list[Stage]:
    rows = SagaStep.objects.filter(saga_id=saga_id).order_by("index")
    values = rows.with_definition().values_list("index", "name", "status", "stage_definition")
    return [Stage(*row) for row in values]


def _after(stages: list[Stage], stage: Stage) -> tuple[str, ...]:
    return tuple(s.name for s in stages if s.index > stage.index)


def _over(saga: Saga, stage: Stage) -> str:
    """Why a signal or a decision for `stage` would be refused now."""
    if saga.is_final:
        return f"The saga is {saga.status}."
    if saga.is_backward:
        return "The saga is compensating."
    if stage.status == StepStatus.PENDING:
        return f"The saga has not reached {stage.name} yet."
    return f"Its wait {stage.name} is over ({stage.status})."


def _failing(saga: Saga, stages: list[Stage], action: str, what: str) -> Plan:
    """The plan of a wait that fails (a rejection, a signal that fails it): the saga
    compensates, or pauses for an operator past its pivot, as the engine does."""
    passed_pivot = any(
        s.definition.get("pivot") and s.status == StepStatus.COMPLETED for s in stages
    )
    if passed_pivot:
        reason = f"{what}: past its pivot, the saga pauses for an operator; nothing is undone."
        return Plan(action, True, reason)
    undo = services.saga_plan(saga_id=saga.pk, action="compensate").undo
    return Plan(action, True, f"{what}: the saga compensates its completed steps.", undo=undo)


def decision_plan(saga: Saga, action: str) -> Plan:
    """What approving or rejecting the saga's approval would do now: the stages it runs after
    the approval, or the compensations it runs, in their order."""
    stages = _stages(saga.pk)
    approvals = [s for s in stages if is_wait(s.definition) and s.definition.get("approval")]
    if not approvals:
        return Plan(action, False, "The saga has no approval.")
    waiting = [s for s in approvals if s.status == StepStatus.WAITING]
    if saga.status != SagaStatus.WAITING or not waiting:
        pending = [s for s in approvals if s.status == StepStatus.PENDING]
        return Plan(action, False, _over(saga, (pending or approvals)[0]))
    stage = waiting[0]
    if action == APPROVE:
        reason = f"Approve {stage.name}: the saga goes on."
        return Plan(action, True, reason, run=_after(stages, stage))
    return _failing(saga, stages, action, f"Reject {stage.name} (approval_rejected)")


@dataclass(frozen=True)
class SignalPreview:
    """What sending the signal would do now: `outcome` (consumed, kept, refused, repeated),
    and the plan (what happens, the stages it runs or undoes)."""

    outcome: str
    plan: Plan


def signal_preview(saga: Saga, event: str, *, fails: bool, key: str) -> SignalPreview:
    first = SagaSignal.objects.filter(saga=saga, idempotency_key=key).first() if key else None
    if first is not None:
        reason = (
            f"This key was used before (a signal {first.event}, {first.get_status_display()}): "
            "the signal gets the first one's answer, and nothing more happens."
        )
        return SignalPreview("repeated", Plan(SIGNAL, False, reason))
    stages = _stages(saga.pk)
    found = [s for s in stages if is_wait(s.definition) and s.definition.get("event") == event]
    if not found:
        return SignalPreview(SignalStatus.REFUSED, Plan(SIGNAL, False, f"No wait for {event}."))
    stage = found[0]
    if saga.status == SagaStatus.WAITING and stage.status == StepStatus.WAITING:
        if fails:
            return SignalPreview(
                SignalStatus.CONSUMED,
                _failing(saga, stages, SIGNAL, f"It fails the wait {stage.name} now"),
            )
        reason = (
            f"It ends the wait {stage.name} now: its payload is the wait's output, and the saga "
            "goes on."
        )
        return SignalPreview(
            SignalStatus.CONSUMED, Plan(SIGNAL, True, reason, run=_after(stages, stage))
        )
    if stage.status == StepStatus.PENDING and not saga.is_backward and not saga.is_final:
        reason = f"The wait {stage.name} consumes it when the saga reaches it."
        return SignalPreview(SignalStatus.KEPT, Plan(SIGNAL, True, reason))
    reason = f"{_over(saga, stage)} It would be recorded, and change nothing."
    return SignalPreview(SignalStatus.REFUSED, Plan(SIGNAL, False, reason))


# -- sending a signal ----------------------------------------------------------------------------


class SignalForm(forms.Form):
    """A signal to one saga (`services.saga_signal`), as the API takes it."""

    event = forms.ChoiceField(help_text="The event a wait of the saga waits for.")
    payload = forms.JSONField(
        required=False,
        widget=forms.Textarea(attrs=JSON_TEXTAREA),
        help_text="JSON: what the event carries, the wait's output. Empty for null.",
    )
    idempotency_key = forms.RegexField(
        r"^[\x21-\x7e]{1,200}\Z",
        max_length=200,
        required=False,
        error_messages={"invalid": "Printable ASCII, no spaces."},
        help_text="Sent again with the same key, the signal gets its first answer. Empty: the "
        "admin gives it one, so that this form, sent twice, sends it once.",
    )
    fail = forms.BooleanField(
        required=False,
        label="Fail the wait",
        help_text="Instead of ending the wait with the payload: a business failure of the "
        "saga, which compensates (or pauses, past its pivot).",
    )
    fail_code = forms.RegexField(
        r"^[a-z0-9_]{1,100}\Z",
        max_length=100,
        required=False,
        label="Failure code",
        error_messages={"invalid": "Lowercase letters, digits and _ (such as 3ds_failed)."},
    )
    fail_message = forms.CharField(max_length=500, required=False, label="Failure message")

    def __init__(self, *args: Any, events: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        event: Any = self.fields["event"]
        event.choices = [(name, name) for name in events]
        if len(events) == 1:
            event.initial = events[0]

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("fail"):
            for field in ("fail_code", "fail_message"):
                if not cleaned.get(field) and field not in self.errors:
                    self.add_error(field, "Needed to fail the wait.")
        return cleaned

    def failure(self) -> dict[str, str] | None:
        if not self.cleaned_data.get("fail"):
            return None
        return {
            "code": self.cleaned_data["fail_code"],
            "message": self.cleaned_data["fail_message"],
        }


class SagaSignalAdmin(admin.ModelAdmin):
    """The saga page's form that sends a signal to one of its waits, for staff with
    `sagas.signal_saga`: a preview first, then the signal (`services.saga_signal`)."""

    def get_urls(self) -> list[URLPattern]:
        signal = path(
            "<path:object_id>/signal/",
            self.admin_site.admin_view(self.signal_view),
            name="sagas_saga_signal",
        )
        return [signal, *super().get_urls()]

    def has_signal_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, SIGNAL)

    def render_change_form(
        self,
        request: HttpRequest,
        context: dict[str, Any],
        add: bool = False,
        change: bool = False,
        form_url: str = "",
        obj: Any = None,
    ) -> HttpResponse:
        # "Send a signal…" on the page of an unfinished saga with a wait that takes one.
        offered = obj is not None and not obj.is_final and self.has_signal_permission(request)
        if offered and signal_events(obj):
            context["saga_signal_url"] = reverse("admin:sagas_saga_signal", args=[obj.pk])
        return super().render_change_form(request, context, add, change, form_url, obj)

    def signal_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        saga = self.get_object(request, unquote(object_id))
        if saga is None:
            raise Http404("No such saga.")
        if not (
            self.has_view_or_change_permission(request, saga)
            and self.has_signal_permission(request)
        ):
            raise PermissionDenied
        detail = reverse("admin:sagas_saga_change", args=[saga.pk])
        events = signal_events(saga)
        if not events:
            self.message_user(request, "No wait of this saga takes a signal.", messages.ERROR)
            return HttpResponseRedirect(detail)
        if request.method != "POST":
            return self._signal_page(request, saga, SignalForm(events=events))
        form = SignalForm(request.POST, events=events)
        if "_edit" in request.POST:  # back from the preview, to change what it sends
            return self._signal_page(request, saga, form)
        preview = self._checked(saga, form)
        if preview is None or "_send" not in request.POST:
            return self._signal_page(request, saga, form, preview)
        outcome = self._send(request, saga, form)
        if outcome is None:  # refused by its wait's checks: the form again, with the errors
            return self._signal_page(request, saga, form)
        return HttpResponseRedirect(detail)

    def _checked(self, saga: Saga, form: SignalForm) -> SignalPreview | None:
        """The form's signal checked as the service checks it (its wait's payload checks,
        nothing stored), and previewed; None with the form's errors."""
        if not form.is_valid():
            return None
        event, payload = form.cleaned_data["event"], form.cleaned_data["payload"]
        try:
            check_payload(saga.pk, event, payload, fail=bool(form.failure()))
            return signal_preview(
                saga,
                event,
                fails=bool(form.failure()),
                key=form.cleaned_data["idempotency_key"],
            )
        except ValidationError as error:
            form.add_error(None, error)
        except SignalError as error:
            form.add_error("event", str(error))
        except SagaBusy as busy:
            form.add_error(None, str(busy))
        return None

    def _send(self, request: HttpRequest, saga: Saga, form: SignalForm) -> SignalOutcome | None:
        data = form.cleaned_data
        try:
            outcome = services.saga_signal(
                saga_id=saga.pk,
                event=data["event"],
                payload=data["payload"],
                idempotency_key=data["idempotency_key"] or None,
                fail=form.failure(),
            )
        except ValidationError as error:
            form.add_error(None, error)
            return None
        except SignalError as error:
            form.add_error("event", str(error))
            return None
        except Saga.DoesNotExist:
            raise Http404("No such saga.") from None
        level, text = _signal_message(data["event"], outcome, fails=bool(form.failure()))
        self.message_user(request, text, level)
        if not outcome.repeated:
            self.log_change(request, saga, f"Signal {data['event']} sent: {outcome.status}")
        return outcome

    def _signal_page(
        self,
        request: HttpRequest,
        saga: Saga,
        form: SignalForm,
        preview: SignalPreview | None = None,
    ) -> HttpResponse:
        key = ""
        if preview is not None:
            # A key of its own, so that this confirmation, sent twice, sends the signal once.
            key = form.cleaned_data["idempotency_key"] or f"admin-{uuid.uuid4().hex}"
        context = {
            **self.admin_site.each_context(request),
            "title": f"Send a signal to saga {str(saga.pk)[:8]}",
            "opts": self.model._meta,
            "saga": saga,
            "wait": waiting_stage(saga),
            "form": form,
            "preview": preview,
            "send_key": key,
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/signal.html", context)


def _signal_message(event: str, outcome: SignalOutcome, *, fails: bool) -> tuple[int, str]:
    if outcome.repeated:
        return messages.INFO, (
            f"This signal was sent before (its key): it was {outcome.status}, and nothing more "
            "was done."
        )
    if outcome.status == SignalStatus.CONSUMED:
        ended = "failed" if fails else "ended"
        return messages.SUCCESS, f"Signal {event} sent: it {ended} the wait {outcome.stage}."
    if outcome.status == SignalStatus.KEPT:
        return messages.SUCCESS, (
            f"Signal {event} sent: kept for the wait {outcome.stage}, which consumes it when the "
            "saga gets there."
        )
    return (
        messages.ERROR,
        f"Signal {event} refused: {outcome.reason} It is recorded; nothing changed.",
    )
