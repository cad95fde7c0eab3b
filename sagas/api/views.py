"""The saga API's views: sagas with their steps and timeline, the operator actions, signals,
bulk actions (an operator action on every saga that matches a filter), and the signed signal
URLs of external systems.

Reusable: it knows nothing of the domain apps. `sagas.urls` routes `SagaViewSet`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Prefetch, QuerySet
from django.http import QueryDict
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_view,
)
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, ValidationError
from rest_framework.filters import OrderingFilter
from rest_framework.pagination import PageNumberPagination
from rest_framework.permissions import AllowAny, BasePermission, IsAdminUser, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.throttling import ScopedRateThrottle
from rest_framework.views import APIView

from ..bulk import BulkFilter
from ..engine import KEEP, Plan
from ..engine.waits import NotWaiting
from ..exceptions import (
    BulkActionRefused,
    BulkPreviewOutdated,
    InvalidTransition,
    SagaBusy,
    SignalError,
)
from ..models import (
    BulkAction,
    BulkOperation,
    OperatorAction,
    Reconciliation,
    Saga,
    SagaEvent,
    SagaMember,
    SagaStatus,
    SagaStep,
    SignalStatus,
)
from ..paginators import BoundedPaginator
from ..permissions import may_operate
from ..services import (
    KeyReused,
    bulk_action_preview,
    bulk_action_start,
    operator_request_once,
    saga_approve,
    saga_compensate,
    saga_plan,
    saga_reconcile,
    saga_reject,
    saga_repair,
    saga_retry,
    saga_signal,
    saga_skip,
    saga_step_resolve,
)
from ..signing import BadSignalToken, read_signal_token
from .parsers import idempotency_key
from .serializers import (
    BulkActionDetailSerializer,
    BulkActionRequestSerializer,
    BulkActionSerializer,
    BulkPreviewRequestSerializer,
    BulkPreviewSerializer,
    DecisionRequestSerializer,
    DetailSerializer,
    MemberQuerySerializer,
    PlanQuerySerializer,
    PlanSerializer,
    RetryRequestSerializer,
    SagaDetailSerializer,
    SagaSerializer,
    SignalRequestSerializer,
    SignalSerializer,
    SkipRequestSerializer,
    future,
)

# -- shared pieces, also used by the domain apps' APIs ------------------------------------------


class Pagination(PageNumberPagination):
    """Pages of 20 by default; `page_size` asks for up to 100. `count` stops
    `SAGAS_LIST_COUNT_LIMIT` rows past the page asked for (`BoundedPaginator`): a list of
    millions of rows is not counted at every request."""

    django_paginator_class = BoundedPaginator
    page_size = 20
    page_size_query_param = "page_size"
    max_page_size = 100


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The resource's current state does not allow this."
    default_code = "conflict"


class ScopedThrottle(ScopedRateThrottle):
    """`ScopedRateThrottle` that reads the rates when it runs, not when DRF was imported.

    So a changed `REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]` (tests, settings overrides) applies.
    """

    def __init__(self) -> None:
        self.THROTTLE_RATES = api_settings.DEFAULT_THROTTLE_RATES
        super().__init__()


ERROR_RESPONSES = {
    401: OpenApiResponse(DetailSerializer, description="Not authenticated."),
    403: OpenApiResponse(
        DetailSerializer, description="Staff only, with the permission for the action."
    ),
    404: OpenApiResponse(DetailSerializer, description="No such saga."),
}

# An operator action's optional Idempotency-Key, and the answers it adds.
IDEMPOTENCY_KEY = OpenApiParameter(
    "Idempotency-Key",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description=(
        "Optional, 1 to 100 printable ASCII characters. The action is taken once per key (and "
        "user): sent again, as when its answer was lost, the request gets the first answer "
        "(with `Idempotent-Replayed: true`) and does nothing more."
    ),
)
KEYED_RESPONSES = {
    400: OpenApiResponse(OpenApiTypes.OBJECT, description="An invalid Idempotency-Key."),
    422: OpenApiResponse(
        DetailSerializer, description="The Idempotency-Key was used for another request."
    ),
}

# -- views ----------------------------------------------------------------------------------------


class SagaFilter(filters.FilterSet):
    status = filters.ChoiceFilter(
        choices=SagaStatus.choices, help_text="Only sagas in this status."
    )
    name = filters.CharFilter(help_text="Only sagas of this definition.")
    key = filters.CharFilter(
        field_name="business_key",
        help_text="Only sagas with this business key (their definition's `key`), such as an "
        "order id: the sagas of an object.",
    )

    reconciliation = filters.ChoiceFilter(
        choices=Reconciliation.choices,
        help_text="Only sagas whose last reconciliation check found this (`discrepant`: the "
        "flagged ones).",
    )

    class Meta:
        model = Saga
        fields = ["status", "name"]


# The views for staff with an action's permission.
OPERATOR_VIEWS = {*OperatorAction.values, "plan", "signals"}
# An approver needs `sagas.approve_saga`, not staff status, and sees every saga to decide it.
DECISIONS = {"approve", "reject"}
# A signal's answer: consumed by its wait, kept for later, or refused (its wait is over).
SIGNAL_STATUS_CODES: dict[str, int] = {
    SignalStatus.CONSUMED: status.HTTP_200_OK,
    SignalStatus.KEPT: status.HTTP_202_ACCEPTED,
    SignalStatus.REFUSED: status.HTTP_409_CONFLICT,
    SignalStatus.DISCARDED: status.HTTP_409_CONFLICT,
}


class MayOperate(BasePermission):
    """Staff act on sagas only with the action's permission, as in the admin."""

    message = "You do not have the permission for this saga action."

    def has_permission(self, request: Request, view: Any) -> bool:
        if view.action == "signals":
            return may_operate(request.user, "signal")
        if view.action in DECISIONS:
            return may_operate(request.user, "approve")
        return view.action not in OperatorAction.values or may_operate(request.user, view.action)


def _with_steps(sagas: QuerySet[Saga], *, events: bool) -> QuerySet[Saga]:
    """Steps (and the timeline) in one query each, whatever the number of sagas."""
    sagas = sagas.prefetch_related(
        Prefetch("steps", queryset=SagaStep.objects.order_by("index")),
        Prefetch("members", queryset=SagaMember.objects.order_by("stage", "position")),
        Prefetch(
            "children",
            queryset=Saga.objects.order_by("created_at").only(
                "id", "name", "status", "parent_id", "parent_stage", "parent_member", "created_at"
            ),
        ),
    )
    if events:
        sagas = sagas.prefetch_related(
            Prefetch("events", queryset=SagaEvent.objects.order_by("id"))
        )
    return sagas


class UnprocessableKey(APIException):
    status_code = status.HTTP_422_UNPROCESSABLE_ENTITY
    default_code = "idempotency_key_reused"


@extend_schema_view(
    list=extend_schema(summary="List sagas", description="Staff see every saga, others their own."),
    retrieve=extend_schema(summary="A saga with its steps and timeline"),
)
class SagaViewSet(viewsets.ReadOnlyModelViewSet):
    """Sagas: users see the ones started on their behalf, staff see all and act on them."""

    # Whatever the project's default permission: a saga list is for signed-in users only.
    permission_classes = [IsAuthenticated]
    pagination_class = Pagination
    filter_backends = [filters.DjangoFilterBackend, OrderingFilter]
    filterset_class = SagaFilter
    ordering_fields = ["created_at", "updated_at", "finished_at", "status", "name"]
    ordering = ["-created_at"]
    lookup_value_regex = "[0-9a-fA-F-]{32,36}"

    def get_queryset(self) -> QuerySet[Saga]:
        user = self.request.user
        every = user.is_staff or (self.action in DECISIONS and may_operate(user, "approve"))
        sagas = Saga.objects.all() if every else Saga.objects.filter(created_by_id=user.pk)
        if self.action in ("list", "retrieve"):
            sagas = _with_steps(sagas, events=self.action == "retrieve")
        return sagas

    def get_serializer_class(self) -> type[serializers.BaseSerializer]:
        return SagaSerializer if self.action == "list" else SagaDetailSerializer

    def get_permissions(self) -> list[BasePermission]:
        if self.action in OPERATOR_VIEWS:
            return [IsAuthenticated(), IsAdminUser(), MayOperate()]
        if self.action in DECISIONS:
            return [IsAuthenticated(), MayOperate()]
        return super().get_permissions()

    def _accepted(self, saga: Saga) -> Response:
        saga = _with_steps(Saga.objects.all(), events=True).get(pk=saga.pk)
        serializer = SagaDetailSerializer(saga, context=self.get_serializer_context())
        return Response(serializer.data, status=status.HTTP_202_ACCEPTED)

    def _act(self, request: Request, do: Callable[..., Plan], choices: str = "") -> Response:
        """Run the action; with an `Idempotency-Key`, once: sent again with the same key
        (its answer was lost), the request gets the first answer and does nothing more.
        `choices`: what the request's body chose, which a key's reuse must repeat."""
        saga = self.get_object()
        key = idempotency_key(request)

        def act() -> tuple[int, Any]:
            try:
                do(saga_id=saga.pk, actor=request.user.get_username())
            except InvalidTransition as exc:
                raise Conflict(str(exc)) from exc
            response = self._accepted(saga)
            return response.status_code, response.data

        if key is None:
            status_code, body = act()
            return Response(body, status=status_code)
        try:
            status_code, body, replayed = operator_request_once(
                user=request.user, key=key, path=f"{request.path}{choices}"[:300], act=act
            )
        except KeyReused as exc:
            raise UnprocessableKey(str(exc)) from exc
        headers = {"Idempotent-Replayed": "true"} if replayed else {}
        return Response(body, status=status_code, headers=headers)

    @extend_schema(
        summary="Retry a failed saga",
        description=(
            "Resume where it stopped: forward, or its compensation. Staff with `sagas.retry_saga`."
        ),
        request=RetryRequestSerializer,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: SagaDetailSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="A bad deadline."),
            409: OpenApiResponse(
                DetailSerializer,
                description="Not failed, or resuming its compensation (no deadline to change).",
            ),
            **ERROR_RESPONSES,
            **KEYED_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, pk: str | None = None) -> Response:
        body = RetryRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        deadline = body.validated_data.get("deadline", KEEP)

        def do(*, saga_id: Any, actor: str) -> Plan:
            if deadline is not KEEP:
                try:
                    future(deadline)
                except ValidationError as exc:  # a 400 with the field's error, no key taken
                    raise ValidationError({"deadline": exc.detail}) from None
            return saga_retry(saga_id=saga_id, actor=actor, deadline=deadline)

        chosen = "" if deadline is KEEP else f" deadline={deadline and deadline.isoformat()}"
        return self._act(request, do, chosen)

    @extend_schema(
        summary="Abort a saga",
        description=(
            "Compensate the completed steps, in reverse order. Staff with `sagas.compensate_saga`."
        ),
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: SagaDetailSerializer,
            409: OpenApiResponse(DetailSerializer, description="Already final or compensating."),
            **ERROR_RESPONSES,
            **KEYED_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def compensate(self, request: Request, pk: str | None = None) -> Response:
        return self._act(request, saga_compensate)

    @extend_schema(
        summary="Resolve a step whose compensation failed",
        description=(
            "Mark it compensated by hand and carry on compensating. "
            "Staff with `sagas.resolve_saga`."
        ),
        request=None,
        parameters=[
            IDEMPOTENCY_KEY,
            OpenApiParameter(
                "index",
                {"type": "integer", "minimum": 0, "maximum": 999999999},
                OpenApiParameter.PATH,
                description="The step's index (0 is the first step).",
            ),
            OpenApiParameter(
                "member",
                {"type": "integer", "minimum": 0, "maximum": 100000},
                OpenApiParameter.QUERY,
                required=False,
                description="A group's stage: the position of its member whose compensation "
                "failed.",
            ),
        ],
        responses={
            202: SagaDetailSerializer,
            409: OpenApiResponse(
                DetailSerializer, description="The step's compensation has not failed."
            ),
            **ERROR_RESPONSES,
            **KEYED_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"], url_path=r"steps/(?P<index>[0-9]{1,9})/resolve")
    def resolve(self, request: Request, pk: str | None = None, index: str = "0") -> Response:
        query = MemberQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        member = query.validated_data.get("member")

        def do(*, saga_id: Any, actor: str) -> Plan:
            return saga_step_resolve(saga_id=saga_id, index=int(index), actor=actor, member=member)

        return self._act(request, do, "" if member is None else f" member {member}")

    @extend_schema(
        summary="Mark a stage as done by hand",
        description=(
            "A waiting stage, or the failed stage a paused saga stopped at going forward, is "
            "marked as done with the output given (which later stages read), and the saga goes "
            "on from there; the note goes on the timeline. Not an approval: approve it. Staff "
            "with `sagas.skip_saga`."
        ),
        request=SkipRequestSerializer,
        parameters=[
            IDEMPOTENCY_KEY,
            OpenApiParameter(
                "index",
                {"type": "integer", "minimum": 0, "maximum": 999999999},
                OpenApiParameter.PATH,
                description="The stage's index (0 is the first stage).",
            ),
        ],
        responses={
            202: SagaDetailSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="An output the stage refuses."),
            409: OpenApiResponse(
                DetailSerializer, description="The stage neither waits nor stopped the saga."
            ),
            **ERROR_RESPONSES,
            **KEYED_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"], url_path=r"steps/(?P<index>[0-9]{1,9})/skip")
    def skip(self, request: Request, pk: str | None = None, index: str = "0") -> Response:
        body = SkipRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        output, note = body.validated_data["output"], body.validated_data["note"]
        member = body.validated_data["member"]

        def do(*, saga_id: Any, actor: str) -> Plan:
            try:
                return saga_skip(
                    saga_id=saga_id,
                    index=int(index),
                    output=output,
                    actor=actor,
                    note=note,
                    member=member,
                )
            except DjangoValidationError as exc:  # a 400 with the field's error, no key taken
                raise ValidationError(exc.message_dict) from None

        chosen_body = [output, note] if member is None else [output, note, member]
        canonical = json.dumps(chosen_body, sort_keys=True, default=str)
        chosen = " " + hashlib.sha256(canonical.encode()).hexdigest()
        return self._act(request, do, chosen)

    @extend_schema(
        summary="Send a signal to a saga",
        description=(
            "The event a wait of the saga waits for: consumed at once if the saga waits for it "
            "(200), kept if the wait is still to come or the saga is busy (202), refused if the "
            "wait is over (409, recorded on the saga's timeline). An `idempotency_key` used "
            "before for this saga gets the first signal's answer, and nothing more is done. "
            "Staff with `sagas.signal_saga`."
        ),
        request=SignalRequestSerializer,
        responses={
            200: SignalSerializer,
            202: SignalSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="Bad event or payload."),
            409: SignalSerializer,
            **ERROR_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def signals(self, request: Request, pk: str | None = None) -> Response:
        saga = self.get_object()
        body = SignalRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        data = body.validated_data
        try:
            outcome = saga_signal(
                saga_id=saga.pk,
                event=data["event"],
                payload=data.get("payload"),
                idempotency_key=data.get("idempotency_key"),
                fail=data.get("fail"),
            )
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
        except SignalError as exc:
            raise ValidationError({"event": [str(exc)]}) from None
        code = SIGNAL_STATUS_CODES[outcome.status]
        return Response(SignalSerializer(outcome).data, status=code)

    def _decide(self, request: Request, *, approve: bool) -> Response:
        saga = self.get_object()
        body = DecisionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        decide = saga_approve if approve else saga_reject
        try:
            outcome = decide(
                saga_id=saga.pk,
                actor=request.user.get_username(),
                note=body.validated_data["note"],
                stage=body.validated_data.get("stage"),
            )
        except NotWaiting as exc:
            raise Conflict(str(exc)) from exc
        except SignalError as exc:
            raise ValidationError({"stage": [str(exc)]}) from None
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
        code = SIGNAL_STATUS_CODES[outcome.status]
        return Response(SignalSerializer(outcome).data, status=code)

    @extend_schema(
        summary="Approve a saga's approval",
        description=(
            "The saga goes on past its approval (the one it waits at, or `stage`); who approved "
            "and the note are on its timeline. 200 decided (or the same decision again: "
            "`repeated`), 202 kept while a step holds the saga (applied within seconds), 409 "
            "if the saga is not at its approval yet or the approval is over (decided, timed "
            "out, the saga compensating or finished). Users with `sagas.approve_saga`."
        ),
        request=DecisionRequestSerializer,
        responses={
            200: SignalSerializer,
            202: SignalSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="Bad note or stage."),
            409: SignalSerializer,
            **ERROR_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str | None = None) -> Response:
        return self._decide(request, approve=True)

    @extend_schema(
        summary="Reject a saga's approval",
        description=(
            "The approval fails (`approval_rejected`), a business failure: the saga compensates "
            "(or pauses for an operator, past its pivot). Answers as approve. Users with "
            "`sagas.approve_saga`."
        ),
        request=DecisionRequestSerializer,
        responses={
            200: SignalSerializer,
            202: SignalSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="Bad note or stage."),
            409: SignalSerializer,
            **ERROR_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def reject(self, request: Request, pk: str | None = None) -> Response:
        return self._decide(request, approve=False)

    @extend_schema(
        summary="Run a final saga's reconciliation check now",
        description=(
            "Its definition's `reconcile` check, against the outside world: discrepancies "
            "flag the saga (`reconciliation`), an agreeing check clears its flag; its status "
            "never changes. Staff with `sagas.reconcile_saga`."
        ),
        request=None,
        parameters=[IDEMPOTENCY_KEY],
        responses={
            202: SagaDetailSerializer,
            409: OpenApiResponse(
                DetailSerializer,
                description="Not final, its parent not final, or its definition has no check.",
            ),
            **ERROR_RESPONSES,
            **KEYED_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"])
    def reconcile(self, request: Request, pk: str | None = None) -> Response:
        return self._act(request, saga_reconcile)

    @extend_schema(
        summary="Run a repair a discrepancy offers",
        description=(
            "Run the compensation of the step again, as a discrepancy the last check found "
            "offers: a worker runs it, records it on the timeline (who, which step, the "
            "result) and runs the check again. The saga's status never changes. Staff with "
            "`sagas.repair_saga`."
        ),
        request=None,
        parameters=[
            IDEMPOTENCY_KEY,
            OpenApiParameter(
                "index",
                {"type": "integer", "minimum": 0, "maximum": 999999999},
                OpenApiParameter.PATH,
                description="The step's index (0 is the first step).",
            ),
        ],
        responses={
            202: SagaDetailSerializer,
            409: OpenApiResponse(
                DetailSerializer, description="No discrepancy offers a repair of that step."
            ),
            **ERROR_RESPONSES,
            **KEYED_RESPONSES,
        },
    )
    @action(detail=True, methods=["post"], url_path=r"steps/(?P<index>[0-9]{1,9})/repair")
    def repair(self, request: Request, pk: str | None = None, index: str = "0") -> Response:
        def do(*, saga_id: Any, actor: str) -> Plan:
            return saga_repair(saga_id=saga_id, index=int(index), actor=actor)

        return self._act(request, do)

    @extend_schema(
        summary="Preview an operator action",
        description=(
            "What retry, compensate, resolve, skip, reconcile or repair would do now, without "
            "doing it. Staff only."
        ),
        parameters=[PlanQuerySerializer],
        responses={
            200: PlanSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="Bad action or index."),
            409: OpenApiResponse(
                DetailSerializer, description="A step is running: try again shortly."
            ),
            **ERROR_RESPONSES,
        },
    )
    @action(detail=True, methods=["get"])
    def plan(self, request: Request, pk: str | None = None) -> Response:
        saga = self.get_object()
        query = PlanQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        try:
            preview = saga_plan(
                saga_id=saga.pk,
                action=query.validated_data["action"],
                index=query.validated_data.get("index"),
                deadline=query.validated_data.get("deadline", KEEP),
                member=query.validated_data.get("member"),
            )
        except SagaBusy as exc:  # a step holds the saga: its action would answer the same
            raise Conflict(str(exc)) from exc
        return Response(PlanSerializer(preview).data)


# -- bulk actions ---------------------------------------------------------------------------------


class MayStartBulkAction(BasePermission):
    """Starting a bulk action needs the permission of one of its actions, at least; the view
    checks the one asked for once the body is valid."""

    message = MayOperate.message

    def has_permission(self, request: Request, view: Any) -> bool:
        return view.action != "create" or any(
            may_operate(request.user, action) for action in BulkOperation.values
        )


@extend_schema_view(
    list=extend_schema(summary="List bulk actions", description="Newest first. Staff only."),
    retrieve=extend_schema(
        summary="A bulk action's progress",
        description="Its counts, and the sagas it skipped or failed on, with the reasons.",
    ),
)
class BulkActionViewSet(viewsets.ReadOnlyModelViewSet):
    """Retry or compensate every saga that matches a filter, or mark a stage of each as done,
    after a preview: staff only."""

    permission_classes = [IsAuthenticated, IsAdminUser, MayStartBulkAction]
    pagination_class = Pagination
    queryset = BulkAction.objects.order_by("-created_at", "-pk")
    lookup_value_regex = "[0-9]{1,18}"

    def get_serializer_class(self) -> type[serializers.BaseSerializer]:
        return BulkActionSerializer if self.action == "list" else BulkActionDetailSerializer

    @staticmethod
    def _filter(request_serializer: serializers.Serializer) -> BulkFilter:
        return BulkFilter(**request_serializer.validated_data["filter"])

    @extend_schema(
        summary="Preview a bulk action",
        description=(
            "How many sagas the filter matches and, in groups of sagas with the same plan, "
            "what the action will run and undo; for a skip, the stage's output checked by "
            "each group's stage. Changes nothing. Staff only."
        ),
        request=BulkPreviewRequestSerializer,
        responses={
            200: BulkPreviewSerializer,
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="Field errors, or more sagas match than one bulk action takes.",
            ),
            **ERROR_RESPONSES,
        },
    )
    @action(detail=False, methods=["post"])
    def preview(self, request: Request) -> Response:
        body = BulkPreviewRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        try:
            preview = bulk_action_preview(
                action=body.validated_data["action"],
                bulk_filter=self._filter(body),
                skip=body.skip(body.validated_data),
            )
        except BulkActionRefused as exc:
            raise serializers.ValidationError({"filter": [str(exc)]}) from exc
        return Response(BulkPreviewSerializer(preview).data)

    @extend_schema(
        summary="Start a bulk action",
        description=(
            "Retry or compensate every saga the filter matches, or mark its stage `stage` as "
            "done with `output` (action=skip), in the background, in batches. A saga that "
            "changed since (no longer matching, no longer allowed by its plan, busy), or whose "
            "stage cannot be skipped or refuses the output, is skipped and reported. Staff "
            "with the action's permission (`sagas.retry_saga`, `sagas.compensate_saga`, "
            "`sagas.skip_saga`)."
        ),
        request=BulkActionRequestSerializer,
        responses={
            202: BulkActionDetailSerializer,
            400: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="Field errors; no saga matches, or more than one bulk action takes.",
            ),
            409: OpenApiResponse(
                DetailSerializer, description="The filter no longer matches expected_count."
            ),
            **ERROR_RESPONSES,
        },
    )
    def create(self, request: Request) -> Response:
        body = BulkActionRequestSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        operation = body.validated_data["action"]
        if not may_operate(request.user, operation):
            self.permission_denied(request, message=MayOperate.message)
        try:
            bulk_action = bulk_action_start(
                action=operation,
                bulk_filter=self._filter(body),
                actor=request.user.get_username(),
                created_by=request.user,
                expected_count=body.validated_data.get("expected_count"),
                skip=body.skip(body.validated_data),
            )
        except BulkPreviewOutdated as exc:
            raise Conflict(str(exc)) from exc
        except BulkActionRefused as exc:
            raise serializers.ValidationError({"filter": [str(exc)]}) from exc
        serializer = BulkActionDetailSerializer(bulk_action, context=self.get_serializer_context())
        return Response(serializer.data, status=status.HTTP_202_ACCEPTED)


# -- signed signal URLs ---------------------------------------------------------------------------


class Gone(APIException):
    status_code = status.HTTP_410_GONE
    default_code = "gone"


class SignalURLView(APIView):
    """`POST /api/sagas/signals/<token>/`: an external system (a payment provider's webhook)
    sends the event of one wait of one saga, its payload the request's JSON body. The signed
    token is the credential (`sagas.signing`): no session, no API token, no CSRF.

    The same payload posted again to the same URL (a webhook sent again after its answer was
    lost) gets the first answer and does nothing more; a URL completes its wait once. A
    forged or tampered token, or one for a saga that no longer exists, is a 404; an expired
    one a 410; nothing changes.

    A project that also checks its provider's own signature subclasses this view, overrides
    `verify` (raise `PermissionDenied`), and routes the subclass at the same path before
    `include("sagas.urls")`.
    """

    authentication_classes: list[Any] = []
    permission_classes = [AllowAny]

    def verify(self, request: Request) -> None:
        """Check the request before anything is done; raise `PermissionDenied` to refuse it.
        The framework's checks nothing but the token."""

    @extend_schema(
        operation_id="api_sagas_signal_url_create",
        summary="Send a signal through a signed URL",
        description=(
            "For external systems: the body is the event's payload (JSON). 200 consumed, "
            "202 kept, 409 refused (its wait is over); 404 for a bad token or a saga that no "
            "longer exists, 410 for an expired one."
        ),
        request=OpenApiTypes.OBJECT,
        responses={
            200: SignalSerializer,
            202: SignalSerializer,
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="A payload its wait refuses."),
            404: OpenApiResponse(DetailSerializer, description="Not a valid signal URL."),
            409: SignalSerializer,
            410: OpenApiResponse(DetailSerializer, description="An expired signal URL."),
        },
    )
    def post(self, request: Request, token: str) -> Response:
        try:
            saga_id, event = read_signal_token(token)
        except BadSignalToken as exc:
            if exc.expired:
                raise Gone(str(exc)) from None
            raise NotFound(str(exc)) from None
        self.verify(request)
        data = request.data
        payload = data.dict() or None if isinstance(data, QueryDict) else data
        canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
        key = "url:" + hashlib.sha256(f"{token}\n{canonical}".encode()).hexdigest()
        try:
            outcome = saga_signal(
                saga_id=saga_id, event=event, payload=payload, idempotency_key=key
            )
        except Saga.DoesNotExist:
            raise NotFound("This signal URL is not valid.") from None
        except DjangoValidationError as exc:
            raise ValidationError(exc.message_dict) from None
        except SignalError:
            raise NotFound("This signal URL is not valid.") from None
        code = SIGNAL_STATUS_CODES[outcome.status]
        return Response(SignalSerializer(outcome).data, status=code)
