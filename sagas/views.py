"""The approver's page behind a signed approval link (`sagas.signing.approval_url`).

Opening the link (GET) shows the saga, the approval and what each decision does, and changes
nothing: mail scanners and link previews follow links. Only the page's form acts, a POST with
its CSRF token. By default (`SAGAS_APPROVAL_LINK_SIGN_IN`) the approver signs in first, as a
user with `sagas.approve_saga`, and the link only says which approval; otherwise the link is
the credential, and the timeline names the approver it was made for.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect

from . import conf
from .definitions import is_wait
from .engine.waits import storable_text
from .exceptions import SignalError
from .models import Saga, SagaStep, StepStatus
from .permissions import may_operate
from .signing import BadSignalToken, read_approval_token

# A decision's answers, by what became of it.
ANSWERS = {
    ("consumed", True): "Approved: the saga goes on.",
    ("consumed", False): "Rejected: the saga is being undone.",
    ("kept", True): "Approved: it applies within seconds (the saga was busy).",
    ("kept", False): "Rejected: it applies within seconds (the saga was busy).",
}


class DecisionForm(forms.Form):
    decision = forms.ChoiceField(choices=[("approve", "Approve"), ("reject", "Reject")])
    note = forms.CharField(
        max_length=1000, required=False, widget=forms.Textarea, validators=[storable_text]
    )


@method_decorator([never_cache, csrf_protect], name="dispatch")
class ApprovalLinkView(View):
    """`/api/sagas/approvals/<token>/`: the approver's page (GET) and their decision (POST)."""

    template_name = "sagas/approval.html"

    def get(self, request: HttpRequest, token: str) -> HttpResponse:
        return self._handle(request, token, None)

    def post(self, request: HttpRequest, token: str) -> HttpResponse:
        return self._handle(request, token, DecisionForm(request.POST))

    def _handle(self, request: HttpRequest, token: str, form: DecisionForm | None) -> HttpResponse:
        try:
            saga_id, stage, approver = read_approval_token(token)
        except BadSignalToken as exc:
            return self._page(request, {"error": str(exc)}, 410 if exc.expired else 404)
        if conf.approval_link_sign_in():
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not may_operate(request.user, "approve"):
                error = "You do not have the permission to approve or reject sagas."
                return self._page(request, {"error": error}, 403)
        found = _approval(saga_id, stage)
        if found is None:
            return self._page(request, {"error": "This approval link is not valid."}, 404)
        saga, step = found
        context: dict[str, Any] = {"saga": saga, "step": step, **_consequences(saga, step)}
        if form is None:
            context["form"] = DecisionForm()
            return self._page(request, context, 200)
        if not form.is_valid():
            context["form"] = form
            return self._page(request, context, 400)
        approve = form.cleaned_data["decision"] == "approve"
        if request.user.is_authenticated:
            actor = request.user.get_username()
        else:
            actor = f"{approver or 'an approver'} (by link)"
        from .services import saga_approve, saga_reject

        decide = saga_approve if approve else saga_reject
        try:
            outcome = decide(
                saga_id=saga.pk, actor=actor, note=form.cleaned_data["note"], stage=stage
            )
        except SignalError as exc:
            return self._page(request, {**context, "error": str(exc)}, 409)
        except ValidationError as exc:  # the form checks first: the service's last word
            return self._page(request, {**context, "error": "; ".join(exc.messages)}, 400)
        if outcome.repeated:
            context["done"] = "This decision was taken already."
        elif outcome.status in ("consumed", "kept"):
            context["done"] = ANSWERS[(outcome.status, approve)]
        else:
            return self._page(request, {**context, "error": outcome.reason}, 409)
        return self._page(request, context, 202 if outcome.status == "kept" else 200)

    def _page(self, request: HttpRequest, context: dict[str, Any], status: int) -> HttpResponse:
        response = render(request, self.template_name, context, status=status)
        # The token is in the URL: never sent on to another site, never indexed.
        response["Referrer-Policy"] = "no-referrer"
        response["X-Robots-Tag"] = "noindex, nofollow"
        return response


def _approval(saga_id: str, stage: str) -> tuple[Saga, SagaStep] | None:
    try:
        saga = Saga.objects.filter(pk=saga_id).first()
    except ValidationError:
        return None
    if saga is None:
        return None
    step = SagaStep.objects.filter(saga=saga, name=stage).first()
    if step is None or not is_wait(step.definition) or not step.definition.get("approval"):
        return None
    return saga, step


def _consequences(saga: Saga, step: SagaStep) -> dict[str, Any]:
    """What approving runs (the stages after the approval) and what rejecting undoes (the
    completed steps' compensations, last first), for the page to say."""
    steps = list(SagaStep.objects.filter(saga=saga).order_by("index"))
    undoes = [
        s.name
        for s in reversed(steps[: step.index])
        if s.status == StepStatus.COMPLETED and s.definition.get("compensation")
    ]
    return {
        "runs": [s.name for s in steps[step.index + 1 :]],
        "undoes": undoes,
        "waiting": saga.status == "waiting" and step.status == StepStatus.WAITING,
    }
