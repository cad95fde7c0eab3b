"""Marking a stage as done by hand in the admin: the saga page's "Mark as done…" button for the
stage that may be skipped now (and one for each failed member of a group that may be), and its
page (`SagaSkipAdmin`), for staff with `sagas.skip_saga`.

The page takes the stage's output (JSON) and a note, previews what runs after the stage
(`services.saga_plan(action="skip")`), and on confirmation calls `services.saga_skip` once per
confirmation (the confirmation pages' one-time token, `OperatorActionsAdmin._act_once`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse

from .. import services
from ..engine import Plan
from ..engine.operator import check_output
from ..exceptions import InvalidTransition, SagaBusy
from ..models import OperatorAction, Saga, SagaMember, SagaStatus, SagaStep, StepStatus
from ..permissions import may_operate
from .actions import ACTION_WORDS, Choices, DecisionForm, OperatorActionsAdmin
from .waits import JSON_TEXTAREA

# The statuses of a saga that may have a stage to mark as done: waiting, or paused (failed).
MAY_SKIP = (SagaStatus.WAITING, SagaStatus.FAILED)
# The failed members of a group a saga page offers to mark as done, at most (a map's can be
# thousands: the API and bulk actions take them all).
MEMBERS_SHOWN = 20


class SkipForm(DecisionForm):
    """The output of the stage marked as done, and the note for the timeline."""

    output = forms.JSONField(
        required=False,
        widget=forms.Textarea(attrs=JSON_TEXTAREA),
        help_text="JSON: the stage's output, which the stages after it read. Empty for null.",
    )
    field_order: tuple[str, ...] = ("output", "note")


def skippable_stage(saga: Saga) -> SagaStep | None:
    """The stage of `saga` that may be marked as done now: the one it waits at or stopped at,
    if its plan (from the rows as they are, without waiting for the lock) allows it."""
    if saga.status not in MAY_SKIP:
        return None
    stage = next((s for s in saga.steps.all() if s.index == saga.current_step), None)
    if stage is None:
        return None
    try:
        plan = services.saga_plan(
            saga_id=saga.pk, action=OperatorAction.SKIP, index=stage.index, locked=False
        )
    except Saga.DoesNotExist:
        return None
    return stage if plan.allowed else None


def skippable_members(saga: Saga) -> list[tuple[str, SagaMember]]:
    """The failed members of the group `saga` paused in that may be marked as done now (the
    first `MEMBERS_SHOWN`), each with its name on the timeline (`<group>.<member>`)."""
    if saga.status != SagaStatus.FAILED:
        return []
    stage = next((s for s in saga.steps.all() if s.index == saga.current_step), None)
    if stage is None or stage.definition.get("kind") != "group":
        return []
    failed = SagaMember.objects.filter(saga=saga, stage=stage.index, status=StepStatus.FAILED)
    members = []
    for member in failed.order_by("position")[:MEMBERS_SHOWN]:
        plan = services.saga_plan(
            saga_id=saga.pk,
            action=OperatorAction.SKIP,
            index=stage.index,
            member=member.position,
            locked=False,
        )
        if plan.allowed:
            members.append((f"{stage.name}.{member.name}", member))
    return members


class SagaSkipAdmin(OperatorActionsAdmin):
    """The saga page's "Mark as done…" and its page: the form, its preview, the skip."""

    def get_urls(self) -> list[URLPattern]:
        skip = path(
            "<path:object_id>/steps/<int:index>/skip/",
            self.admin_site.admin_view(self.skip_view),
            name="sagas_saga_skip",
        )
        skip_member = path(
            "<path:object_id>/steps/<int:index>/members/<int:position>/skip/",
            self.admin_site.admin_view(self.skip_view),
            name="sagas_saga_skip_member",
        )
        return [skip, skip_member, *super().get_urls()]

    def has_skip_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, OperatorAction.SKIP)

    def saga_tools(self, request: HttpRequest, saga: Saga) -> dict[str, Any]:
        tools = super().saga_tools(request, saga)
        stage = skippable_stage(saga) if self.has_skip_permission(request) else None
        if stage is not None:
            tools["saga_skip_url"] = reverse("admin:sagas_saga_skip", args=[saga.pk, stage.index])
            tools["saga_skip_stage"] = stage.name
        if self.has_skip_permission(request):
            url = "admin:sagas_saga_skip_member"
            tools["saga_skip_members"] = [
                (label, reverse(url, args=[saga.pk, m.stage, m.position]))
                for label, m in skippable_members(saga)
            ]
        return tools

    def skip_view(
        self, request: HttpRequest, object_id: str, index: int, position: int | None = None
    ) -> HttpResponse:
        saga = self.one_saga(request, object_id, permitted=self.has_skip_permission(request))
        stage = next((s for s in saga.steps.all() if s.index == index), None)
        if stage is None:
            raise Http404("No such stage.")
        target = Target(stage)
        if position is not None:
            member = SagaMember.objects.filter(saga=saga, stage=index, position=position).first()
            if member is None:
                raise Http404("No such member.")
            target = Target(stage, member)
        if request.method != "POST":
            return self._skip_page(request, saga, target, SkipForm())
        form = SkipForm(request.POST)
        if "_edit" in request.POST:  # back from the preview, to change the output or the note
            return self._skip_page(request, saga, target, form)
        if request.POST.get("post") == "yes" and form.is_valid():
            return self._skip(request, saga, target, form)
        return self._skip_page(request, saga, target, form, self._preview(saga, target, form))

    def _preview(self, saga: Saga, target: Target, form: SkipForm) -> Plan | None:
        """The form's output checked as the service checks it (nothing changes), and what
        marking the stage (or member) as done would do now; None with the form's errors."""
        if not form.is_valid():
            return None
        index, member = target.stage.index, target.position
        try:
            check_output(saga.pk, index, form.cleaned_data["output"], member=member)
            return services.saga_plan(
                saga_id=saga.pk, action=OperatorAction.SKIP, index=index, member=member
            )
        except ValidationError as error:
            form.add_error(None, error)
        except SagaBusy as busy:
            form.add_error(None, str(busy))
        except Saga.DoesNotExist:
            raise Http404("No such saga.") from None
        return None

    def _skip(
        self, request: HttpRequest, saga: Saga, target: Target, form: SkipForm
    ) -> HttpResponse:
        """Mark the stage (or member) as done, once per confirmation; then back to the saga's
        page, or the form again with the errors of an output the stage refuses."""
        detail = HttpResponseRedirect(reverse("admin:sagas_saga_change", args=[saga.pk]))
        choices = Choices(
            note=form.cleaned_data["note"],
            index=target.stage.index,
            output=form.cleaned_data["output"],
            member=target.position,
        )
        actor, name = request.user.get_username(), target.name
        try:
            plan = self._act_once(request, saga, OperatorAction.SKIP, actor, choices)
        except ValidationError as error:  # refused by the stage's checks: nothing changed
            form.add_error(None, error)
            return self._skip_page(request, saga, target, form)
        except InvalidTransition as error:  # its state no longer allows it, or busy
            self.message_user(request, f"Saga {saga.pk} was not changed: {error}", messages.ERROR)
            return detail
        except Saga.DoesNotExist:
            raise Http404("No such saga.") from None
        if not isinstance(plan, Plan):  # this confirmation acted before: nothing more
            self.message_user(
                request,
                f"This confirmation was sent before: {name} was marked as done then, and "
                "nothing was done again.",
                messages.WARNING,
            )
            return detail
        self.log_change(request, saga, f"Marked {name} as done by an operator")
        then = "the saga goes on." if plan.run else "the saga completed."
        self.message_user(request, f"Marked {name} as done: {then}", messages.SUCCESS)
        return detail

    def _skip_page(
        self,
        request: HttpRequest,
        saga: Saga,
        target: Target,
        form: SkipForm,
        preview: Plan | None = None,
    ) -> HttpResponse:
        context = {
            **self.admin_site.each_context(request),
            "title": f"Mark {target.name} as done",
            "opts": self.model._meta,
            "saga": saga,
            "stage": target.stage,
            "target": target,
            "operator_action": ACTION_WORDS[OperatorAction.SKIP],
            "form": form,
            "preview": preview,
            # A one-time token: the confirmation, sent twice (its answer lost), acts once.
            "once": uuid.uuid4().hex,
            "media": self.media + form.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/skip.html", context)


@dataclass(frozen=True)
class Target:
    """What a skip page marks as done: a stage, or one member of its group."""

    stage: SagaStep
    member: SagaMember | None = None

    @property
    def position(self) -> int | None:
        return self.member.position if self.member is not None else None

    @property
    def name(self) -> str:
        """As the timeline names it: `<group>.<member>` for a member."""
        if self.member is None:
            return self.stage.name
        return f"{self.stage.name}.{self.member.name}"

    @property
    def kind(self) -> str:
        return "member" if self.member is not None else "stage"

    @property
    def status_display(self) -> str:
        row = self.member if self.member is not None else self.stage
        return str(row.get_status_display()).lower()
