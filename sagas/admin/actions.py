"""The operator actions of the saga admin: retry, compensate and resolve, and approve and reject
an approval, each confirmed first.

Each action shows what it will do to every selected saga (from `services.saga_plan`, or for a
decision `waits.decision_plan`) on a confirmation page, then calls the matching service: the
admin holds no saga logic of its own. A saga's page offers the same actions as buttons, which
post to the list's action; approve and reject have a page of their own for one saga, whose
confirmation acts through the same code, as does marking a stage as done (`skip`).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.contrib.admin.utils import unquote
from django.core.exceptions import PermissionDenied, ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.safestring import SafeString

from .. import conf, services
from ..durations import parse_duration
from ..engine import KEEP, Deadline, Plan, reconcile
from ..engine.waits import SignalOutcome, storable_text
from ..exceptions import InvalidTransition, SagaBusy, SignalError
from ..models import Direction, OperatorAction, Saga, SignalStatus, StepStatus
from ..permissions import may_operate
from .display import status_badge
from .waits import APPROVE, DECISIONS, REJECT, decision_plan, waits_at_an_approval

ONCE_TOKEN = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class ActionWords:
    """One operator action's admin action name and the words for it on the pages."""

    name: str
    verb: str
    done: str
    explanation: str


ACTION_WORDS: dict[str, ActionWords] = {
    OperatorAction.RETRY: ActionWords(
        "retry_sagas",
        "Retry",
        "Retried",
        "Retrying resumes a failed saga where it stopped: steps that completed are not run "
        "again. A saga that failed while compensating resumes its compensation.",
    ),
    OperatorAction.COMPENSATE: ActionWords(
        "compensate_sagas",
        "Compensate",
        "Compensating",
        "Compensating aborts the saga and undoes its completed steps, in reverse order.",
    ),
    OperatorAction.RESOLVE: ActionWords(
        "resolve_sagas",
        "Resolve",
        "Resolved",
        "Resolving marks the step whose compensation failed as compensated by hand (you "
        "undid its effect yourself); the remaining compensations then run.",
    ),
    OperatorAction.RECONCILE: ActionWords(
        "reconcile_sagas",
        "Reconcile",
        "Reconciled",
        "Reconciling runs the definition's reconciliation check of each final saga now, "
        "against the outside world: discrepancies flag the saga, an agreeing check clears its "
        "flag. A saga's status never changes.",
    ),
    OperatorAction.REPAIR: ActionWords(
        "repair_sagas",
        "Repair",
        "Repair sent for",
        "Repairing runs again the compensation of the step a discrepancy of the last check "
        "names (a refund of a charge that landed late, say), in a worker; the repair and its "
        "result go on the saga's timeline, and the check runs again. A saga's status never "
        "changes.",
    ),
    APPROVE: ActionWords(
        "approve_sagas",
        "Approve",
        "Approved",
        "Approving decides the approval the saga waits at: the saga goes on with the stages "
        "after it. Who approved, and the note, are on its timeline.",
    ),
    REJECT: ActionWords(
        "reject_sagas",
        "Reject",
        "Rejected",
        "Rejecting fails the approval the saga waits at (approval_rejected): the saga undoes "
        "its completed steps, in reverse order, or pauses for an operator if it passed its "
        "pivot. Who rejected, and the note, are on its timeline.",
    ),
    OperatorAction.SKIP: ActionWords(
        "",  # one stage's, on a page of its own (`skip.SagaSkipAdmin`): no list action
        "Mark as done",
        "Marked as done",
        "Marking a stage as done ends it by hand with the output you give, which the stages "
        "after it read: a wait that waits (its event is then refused as late), or the failed "
        "stage a paused saga stopped at. The saga goes on from there. Never an approval. Who "
        "did it, and the note, are on its timeline.",
    ),
}
# The actions with a page of their own for one saga, not a list action.
OWN_PAGES = (*DECISIONS, OperatorAction.SKIP)
# The actions on a final saga only (`sagas.engine.reconcile`).
FINAL_ONLY = (OperatorAction.RECONCILE, OperatorAction.REPAIR)


class RetryDeadlineForm(forms.Form):
    """What a retry does to the deadline of the sagas it resumes forward."""

    deadline = forms.ChoiceField(
        choices=[
            ("keep", "Keep it (one that passed while the saga waited is cleared)"),
            ("clear", "Clear it: the saga has no deadline any more"),
            ("extend", "Set it to now plus:"),
        ],
        initial="keep",
        widget=forms.RadioSelect,
        label="Deadline",
    )
    extend_by = forms.CharField(
        required=False,
        max_length=20,
        label="Now plus",
        help_text="A whole number and a unit, s, m, h, d or w (such as 2h or 3d).",
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean() or {}
        if cleaned.get("deadline") == "extend":
            try:
                cleaned["duration"] = parse_duration(cleaned.get("extend_by") or "")
            except ValueError as error:
                self.add_error("extend_by", str(error))
        return cleaned

    def chosen(self) -> Deadline:
        """The deadline to give `saga_retry`: KEEP, None (cleared), or now plus the duration."""
        choice = self.cleaned_data["deadline"]
        if choice == "clear":
            return None
        if choice == "extend":
            return timezone.now() + self.cleaned_data["duration"]
        return KEEP


class DecisionForm(forms.Form):
    """The note of an approval's decision, for the saga's timeline."""

    note = forms.CharField(
        required=False,
        max_length=1000,
        widget=forms.Textarea(attrs={"rows": 3, "cols": 60, "class": "vLargeTextField"}),
        help_text="Why, for the saga's timeline (with your name).",
        validators=[storable_text],
    )


@dataclass(frozen=True)
class Choices:
    """What the operator chose on a confirmation page: a retry's deadline, a decision's note,
    the stage (or a group's member) marked as done and its output."""

    deadline: Deadline = KEEP
    note: str = ""
    index: int = 0
    output: Any = None
    member: int | None = None  # a group's member marked as done, by its position


@dataclass(frozen=True)
class Preview:
    """What an action will do to one saga, for the confirmation page."""

    saga: Saga
    plan: Plan

    @property
    def status_badge(self) -> SafeString:
        return status_badge(self.saga.status, self.saga.get_status_display())


class OperatorActionsAdmin(admin.ModelAdmin):
    """The operator actions of a saga ModelAdmin, each gated by its own permission."""

    actions = (
        "retry_sagas",
        "compensate_sagas",
        "resolve_sagas",
        "approve_sagas",
        "reject_sagas",
        "reconcile_sagas",
        "repair_sagas",
    )

    def has_retry_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, OperatorAction.RETRY)

    def has_compensate_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, OperatorAction.COMPENSATE)

    def has_resolve_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, OperatorAction.RESOLVE)

    def has_approve_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, APPROVE)

    def has_reconcile_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, OperatorAction.RECONCILE)

    def has_repair_permission(self, request: HttpRequest) -> bool:
        return may_operate(request.user, OperatorAction.REPAIR)

    def get_urls(self) -> list[URLPattern]:
        decisions = [
            path(
                f"<path:object_id>/{action}/",
                self.admin_site.admin_view(self.decision_view),
                {"action": action},
                name=f"sagas_saga_{action}",
            )
            for action in DECISIONS
        ]
        return [*decisions, *super().get_urls()]

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
            context.update(self.saga_tools(request, obj))
        return super().render_change_form(request, context, add, change, form_url, obj)

    def saga_tools(self, request: HttpRequest, saga: Saga) -> dict[str, Any]:
        """The saga page's buttons of the operator actions, as its template's context; an
        action with a page of its own (`skip.SagaSkipAdmin`) adds its own."""
        return {
            "saga_operator_actions": self._buttons(request, saga),
            "saga_decisions": self._decision_buttons(request, saga),
            "saga_changelist_url": reverse("admin:sagas_saga_changelist"),
        }

    def _buttons(self, request: HttpRequest, saga: Saga) -> list[ActionWords]:
        """The actions this user may take on a saga that is not finished.

        Whether an action applies is for its confirmation page to say (from `saga_plan`): a
        plan locks the saga row, which a page view should not wait for while a step runs.
        """
        if saga.is_final:  # reconciled, and repaired where a discrepancy offers a repair
            final = [OperatorAction.RECONCILE] if reconcile.check_of(saga.name) else []
            final += [OperatorAction.REPAIR] if self._repair_index(saga) is not None else []
            return [ACTION_WORDS[a] for a in final if may_operate(request.user, a)]
        stuck = any(s.status == StepStatus.COMPENSATION_FAILED for s in saga.steps.all())
        return [
            words
            for action, words in ACTION_WORDS.items()
            if action not in (*OWN_PAGES, *FINAL_ONLY)
            and may_operate(request.user, action)
            and (action != OperatorAction.RESOLVE or stuck)
        ]

    def _decision_buttons(self, request: HttpRequest, saga: Saga) -> list[tuple[ActionWords, str]]:
        """Approve and reject, with their pages' URLs, for a saga that waits at an approval."""
        if not (self.has_approve_permission(request) and waits_at_an_approval(saga)):
            return []
        return [
            (ACTION_WORDS[action], reverse(f"admin:sagas_saga_{action}", args=[saga.pk]))
            for action in DECISIONS
        ]

    def one_saga(self, request: HttpRequest, object_id: str, *, permitted: bool) -> Saga:
        """The saga of a page of its own, for a user with the action's permission
        (`permitted`) who may view it: 403 otherwise, 404 for no such saga."""
        if not permitted:
            raise PermissionDenied
        saga = self.get_object(request, unquote(object_id))
        if saga is None:
            raise Http404("No such saga.")
        if not self.has_view_or_change_permission(request, saga):
            raise PermissionDenied
        return saga

    def decision_view(self, request: HttpRequest, object_id: str, action: str) -> HttpResponse:
        """Approve or reject one saga's approval: its confirmation page (GET), and the decision
        (POST, confirmed), then back to the saga's page."""
        saga = self.one_saga(request, object_id, permitted=self.has_approve_permission(request))
        if request.method == "POST" and request.POST.get("post") == "yes":
            queryset = self.get_queryset(request).filter(pk=saga.pk)
            # The confirmation again (a note too long), or back to the saga's page.
            answer = self._operate(request, queryset, action)
            return answer or HttpResponseRedirect(
                reverse("admin:sagas_saga_change", args=[saga.pk])
            )
        return self._confirmation(request, [saga], action, return_to_detail=True)

    # -- the operator actions ---------------------------------------------------------------

    @admin.action(description="Retry the selected sagas", permissions=[OperatorAction.RETRY])
    def retry_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, OperatorAction.RETRY)

    @admin.action(
        description="Compensate (abort) the selected sagas", permissions=[OperatorAction.COMPENSATE]
    )
    def compensate_sagas(
        self, request: HttpRequest, queryset: QuerySet[Saga]
    ) -> HttpResponse | None:
        return self._operate(request, queryset, OperatorAction.COMPENSATE)

    @admin.action(
        description="Resolve the failed compensation of the selected sagas",
        permissions=[OperatorAction.RESOLVE],
    )
    def resolve_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, OperatorAction.RESOLVE)

    @admin.action(
        description="Run the reconciliation check of the selected sagas",
        permissions=[OperatorAction.RECONCILE],
    )
    def reconcile_sagas(
        self, request: HttpRequest, queryset: QuerySet[Saga]
    ) -> HttpResponse | None:
        return self._operate(request, queryset, OperatorAction.RECONCILE)

    @admin.action(
        description="Run the repair the discrepancies of the selected sagas offer",
        permissions=[OperatorAction.REPAIR],
    )
    def repair_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, OperatorAction.REPAIR)

    @admin.action(description="Approve the approval of the selected sagas", permissions=[APPROVE])
    def approve_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, APPROVE)

    @admin.action(description="Reject the approval of the selected sagas", permissions=[APPROVE])
    def reject_sagas(self, request: HttpRequest, queryset: QuerySet[Saga]) -> HttpResponse | None:
        return self._operate(request, queryset, REJECT)

    @staticmethod
    def _resolve_index(saga: Saga) -> int:
        """The step to resolve: the first whose compensation failed, in compensation order.

        Resolving it restarts the compensation, which retries any other failed one.
        """
        failed = [s.index for s in saga.steps.all() if s.status == StepStatus.COMPENSATION_FAILED]
        return max(failed, default=saga.current_step)

    @staticmethod
    def _repair_index(saga: Saga) -> int | None:
        """The step whose compensation the first repair the saga's discrepancies offer runs
        again, if one does."""
        offered = [d["repair"]["step"] for d in saga.discrepancies or [] if d.get("repair")]
        if not offered:
            return None
        return saga.steps.filter(name=offered[0]).values_list("index", flat=True).first()

    def _plan(self, saga: Saga, action: str) -> Plan:
        if action in DECISIONS:
            return decision_plan(saga, action)
        index = self._resolve_index(saga) if action == OperatorAction.RESOLVE else None
        if action == OperatorAction.REPAIR:
            index = self._repair_index(saga)
            if index is None:
                return Plan(action, False, "No discrepancy of its last check offers a repair.")
        return services.saga_plan(saga_id=saga.pk, action=action, index=index)

    def _act(
        self, saga: Saga, action: str, actor: str, choices: Choices = Choices()
    ) -> Plan | SignalOutcome:
        if action == APPROVE:
            return services.saga_approve(saga_id=saga.pk, actor=actor, note=choices.note)
        if action == REJECT:
            return services.saga_reject(saga_id=saga.pk, actor=actor, note=choices.note)
        if action == OperatorAction.RETRY:
            # The deadline is for the sagas the retry resumes forward; one resuming its
            # compensation has none to change.
            kept = KEEP if saga.direction == Direction.BACKWARD else choices.deadline
            return services.saga_retry(saga_id=saga.pk, actor=actor, deadline=kept)
        if action == OperatorAction.COMPENSATE:
            return services.saga_compensate(saga_id=saga.pk, actor=actor)
        if action == OperatorAction.SKIP:
            return services.saga_skip(
                saga_id=saga.pk,
                index=choices.index,
                output=choices.output,
                actor=actor,
                note=choices.note,
                member=choices.member,
            )
        if action == OperatorAction.RECONCILE:
            return services.saga_reconcile(saga_id=saga.pk, actor=actor)
        if action == OperatorAction.REPAIR:
            repair = self._repair_index(saga)
            if repair is None:
                raise InvalidTransition("No discrepancy of its last check offers a repair.")
            return services.saga_repair(saga_id=saga.pk, index=repair, actor=actor)
        index = self._resolve_index(saga)
        return services.saga_step_resolve(saga_id=saga.pk, index=index, actor=actor)

    def _operate(
        self, request: HttpRequest, queryset: QuerySet[Saga], action: str
    ) -> HttpResponse | None:
        if request.POST.get("select_across") == "1" and self._too_many(queryset):
            # "Select all" on a list of millions: one page of plans would hold them all. The
            # list's count stops at SAGAS_LIST_COUNT_LIMIT too, so it would not say how many.
            self.message_user(
                request,
                f"More than {conf.list_count_limit()} sagas match: narrow the list, or use "
                "“Retry or compensate all matching…”, which works through them in batches.",
                messages.WARNING,
            )
            return None
        sagas = list(queryset.order_by("-created_at"))
        if request.POST.get("post") != "yes":
            return self._confirmation(request, sagas, action)
        choices = Choices()
        if action == OperatorAction.RETRY and "deadline" in request.POST:
            form = RetryDeadlineForm(request.POST)
            if not form.is_valid():  # shown again with its errors: nothing was done
                return self._confirmation(request, sagas, action, form)
            choices = Choices(deadline=form.chosen())
        if action in DECISIONS:
            note = DecisionForm(request.POST)
            if not note.is_valid():
                return self._confirmation(request, sagas, action, decision_form=note)
            choices = Choices(note=note.cleaned_data["note"])
        operator_action = ACTION_WORDS[action]
        actor = request.user.get_username()
        done = repeated = 0
        for saga in sagas:
            try:
                result = self._act_once(request, saga, action, actor, choices)
            except (InvalidTransition, SignalError, Saga.DoesNotExist) as error:
                self.message_user(
                    request, f"Saga {saga.pk} was not changed: {error}", messages.ERROR
                )
                continue
            except ValidationError as error:  # the form checks first: a service's last word
                words = "; ".join(error.messages)
                self.message_user(
                    request, f"Saga {saga.pk} was not changed: {words}", messages.ERROR
                )
                continue
            if result is None:
                repeated += 1
                continue
            if isinstance(result, SignalOutcome):
                if not self._decided(request, saga, result):
                    continue
                reason = f"the approval {result.stage}"
            else:
                reason = result.reason
            done += 1
            self.log_change(request, saga, f"{operator_action.done} by an operator: {reason}")
        if done:
            noun = "saga" if done == 1 else "sagas"
            self.message_user(request, f"{operator_action.done} {done} {noun}.", messages.SUCCESS)
        if repeated:
            self.message_user(
                request,
                f"This confirmation was sent before: {repeated} of its sagas were acted on then, "
                "and nothing was done to them again.",
                messages.WARNING,
            )
        if request.POST.get("_return_to_detail") and len(sagas) == 1:
            return HttpResponseRedirect(reverse("admin:sagas_saga_change", args=[sagas[0].pk]))
        return None  # back to the list, with its filters

    def _decided(self, request: HttpRequest, saga: Saga, outcome: SignalOutcome) -> bool:
        """Say what became of a decision other than a plain success; whether it decided."""
        if outcome.repeated:
            self.message_user(
                request,
                f"Saga {saga.pk}: this decision was taken before; nothing more was done.",
                messages.INFO,
            )
            return False
        if outcome.status == SignalStatus.REFUSED:
            self.message_user(
                request,
                f"Saga {saga.pk} was not changed: the decision was refused. {outcome.reason}",
                messages.ERROR,
            )
            return False
        if outcome.status == SignalStatus.KEPT:
            self.message_user(
                request,
                f"Saga {saga.pk} was busy: the decision is kept, and applied within seconds.",
                messages.INFO,
            )
        return True

    def _act_once(
        self, request: HttpRequest, saga: Saga, action: str, actor: str, choices: Choices
    ) -> Plan | SignalOutcome | None:
        """The action on one saga, once per confirmation: its one-time token and the saga are
        written with the action, in its transaction (`OperatorRequest`), so that a
        confirmation sent again (its answer lost) acts on none of the sagas it acted on, and on
        those it did not reach, or that refused it, as if for the first time. None: it acted
        on this saga before."""
        token = request.POST.get("_once", "")
        if not ONCE_TOKEN.fullmatch(token):
            # A form without the token (a project's own).
            return self._act(saga, action, actor, choices)
        done: list[Plan | SignalOutcome] = []

        def act() -> tuple[int, None]:
            done.append(self._act(saga, action, actor, choices))
            return 200, None

        key = f"admin:{token}:{saga.pk}"
        services.operator_request_once(user=request.user, key=key, path=request.path, act=act)
        return done[0] if done else None

    @staticmethod
    def _too_many(queryset: QuerySet[Saga]) -> bool:
        limit = conf.list_count_limit()
        return queryset.order_by()[: limit + 1].count() > limit

    def _confirmation(
        self,
        request: HttpRequest,
        sagas: list[Saga],
        action: str,
        deadline_form: RetryDeadlineForm | None = None,
        *,
        decision_form: DecisionForm | None = None,
        return_to_detail: bool = False,
    ) -> HttpResponse:
        previews = []
        for saga in sagas:
            try:
                plan = self._plan(saga, action)
            except Saga.DoesNotExist:
                plan = Plan(action, False, "The saga no longer exists.")
            except SagaBusy as busy:  # a step holds it: confirming would be refused the same
                plan = Plan(action, False, str(busy))
            previews.append(Preview(saga, plan))
        operator_action = ACTION_WORDS[action]
        forward = [p for p in previews if p.plan.allowed and p.saga.direction == Direction.FORWARD]
        if action == OperatorAction.RETRY and forward and deadline_form is None:
            deadline_form = RetryDeadlineForm()
        context = {
            **self.admin_site.each_context(request),
            "title": f"{operator_action.verb} sagas: are you sure?",
            "opts": self.model._meta,
            "operator_action": operator_action,
            "previews": previews,
            "allowed_count": sum(1 for preview in previews if preview.plan.allowed),
            "action_checkbox_name": ACTION_CHECKBOX_NAME,
            "return_to_detail": return_to_detail or bool(request.POST.get("_return_to_detail")),
            # A one-time token: the confirmation, sent twice (its answer lost), acts once.
            "once": uuid.uuid4().hex,
            "deadline_form": deadline_form if forward else None,
            "decision_form": (decision_form or DecisionForm()) if action in DECISIONS else None,
            "media": self.media,
        }
        request.current_app = self.admin_site.name
        return TemplateResponse(request, "admin/sagas/saga/action_confirmation.html", context)
