"""The saga API's serializers: sagas with their steps and timeline, plans, and errors; and the
strict input fields that this API and the domain apps' share."""

from __future__ import annotations

import copy
import datetime
from collections.abc import Mapping
from typing import Any

from django.core.validators import RegexValidator
from django.utils import timezone
from drf_spectacular.extensions import OpenApiSerializerExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ValidationError

from ..bulk import BulkFilter, BulkSkip
from ..definitions import is_child, is_group, is_wait
from ..models import (
    STAFF_ONLY_DETAIL,
    BulkAction,
    BulkOperation,
    BulkOutcome,
    OperatorAction,
    Reconciliation,
    Saga,
    SagaEvent,
    SagaMember,
    SagaStatus,
    SagaStep,
)

# The URL names of a saga's and a bulk action's detail: `sagas.urls`, in its namespace.
SAGA_DETAIL = "sagas:saga-detail"
BULK_ACTION_DETAIL = "sagas:bulk-action-detail"


# -- strict input ---------------------------------------------------------------------------------


class StrictCharField(serializers.CharField):
    """A JSON string, and only a string: 12 or true is not a SKU."""

    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, which no database column can hold
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictIntegerField(serializers.IntegerField):
    """A JSON integer, and only an integer: "2", 2.0 and true are refused."""

    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so that a misspelt or unsupported one is not ignored."""

    def to_internal_value(self, data: Any) -> Any:
        unknown = sorted(set(data) - set(self.fields)) if isinstance(data, Mapping) else []
        errors = {str(name)[:64]: ["Unknown field."] for name in unknown[:10]}
        try:
            value = super().to_internal_value(data)
        except ValidationError as exc:
            if errors and isinstance(exc.detail, dict):
                exc.detail.update(ValidationError(errors).detail)  # type: ignore[arg-type]
            raise
        if errors:
            raise ValidationError(errors)
        return value


class StrictSerializerSchema(OpenApiSerializerExtension):
    """Says in the schema what `StrictSerializer` enforces: no properties but the declared."""

    target_class = StrictSerializer
    match_subclasses = True

    def map_serializer(self, auto_schema: Any, direction: Any) -> Any:
        schema = auto_schema._map_serializer(self.target, direction, bypass_extensions=True)
        return {**schema, "additionalProperties": False}


# -- output ---------------------------------------------------------------------------------------


class ModelSerializer(serializers.ModelSerializer):
    """DRF's `ModelSerializer`, whose fields are built from the model once per class.

    DRF builds them again for every serializer it makes, that is on every request: for the
    small nested serializers of a response that was most of their cost. Each serializer still
    gets fields of its own, copied (as DRF copies declared fields), never shared.
    """

    def get_fields(self) -> dict[str, serializers.Field]:
        cls = type(self)
        built = cls.__dict__.get("_fields_built_once")
        if built is None:
            built = super().get_fields()
            cls._fields_built_once = built  # type: ignore[attr-defined]
        return copy.deepcopy(built)


class DetailSerializer(serializers.Serializer):
    """The body of an error response."""

    detail = serializers.CharField(help_text="What went wrong.")


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="A stable, machine-readable error code.")
    message = serializers.CharField(help_text="A safe, human-readable message.")


def _error(obj: Saga | SagaStep | SagaMember) -> dict[str, str] | None:
    if not obj.error_code and not obj.error_message:
        return None
    return {"code": obj.error_code, "message": obj.error_message}


def stage_kind(step: SagaStep) -> str:
    if is_group(step.definition):
        return "group"
    if is_child(step.definition):
        return "child"
    if not is_wait(step.definition):
        return "step"
    return "approval" if step.definition.get("approval") else "wait"


class SagaMemberSerializer(ModelSerializer):
    """A member of a group: a step that runs at the same time as the group's others."""

    error = serializers.SerializerMethodField(help_text="Why the member failed, if it did.")

    class Meta:
        model = SagaMember
        fields = [
            "position",
            "name",
            "status",
            "attempts",
            "error",
            "started_at",
            "finished_at",
            "compensated_at",
        ]
        read_only_fields = fields

    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(self, member: SagaMember) -> dict[str, str] | None:
        return _error(member)


class WaitingSerializer(serializers.Serializer):
    """What a waiting saga waits for."""

    stage = serializers.CharField(help_text="The wait's name.")
    kind = serializers.CharField(help_text="wait, approval, or child (its child saga runs).")
    event = serializers.CharField(allow_null=True, help_text="Its event; none for a timer.")
    since = serializers.DateTimeField(help_text="When it began waiting.")
    until = serializers.DateTimeField(allow_null=True, help_text="Its timeout; none: no end.")


class SagaStepSerializer(ModelSerializer):
    kind = serializers.SerializerMethodField(
        help_text="step, wait (for an event or a time), approval (a person's decision), "
        "group (members that run at the same time), or child (another saga, awaited)."
    )
    error = serializers.SerializerMethodField(help_text="Why the step failed, if it did.")
    event = serializers.SerializerMethodField(help_text="The event a wait waits for, if any.")
    members = serializers.SerializerMethodField(
        help_text="A group's members, in order (none before the group began); null for "
        "another stage."
    )

    class Meta:
        model = SagaStep
        fields = [
            "index",
            "name",
            "kind",
            "status",
            "attempts",
            "error",
            "event",
            "members",
            "started_at",
            "due_at",
            "finished_at",
            "compensated_at",
        ]
        read_only_fields = fields

    def get_kind(self, step: SagaStep) -> str:
        return stage_kind(step)

    def get_event(self, step: SagaStep) -> str | None:
        return step.definition.get("event") if is_wait(step.definition) else None

    @extend_schema_field(SagaMemberSerializer(many=True, allow_null=True))
    def get_members(self, step: SagaStep) -> list[dict[str, Any]] | None:
        if not is_group(step.definition):
            return None
        # The saga's members are prefetched with its steps (`_with_steps`): no query per stage.
        members = [m for m in step.saga.members.all() if m.stage == step.index]
        return SagaMemberSerializer(members, many=True).data  # type: ignore[return-value]

    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(self, step: SagaStep) -> dict[str, str] | None:
        return _error(step)


class SagaEventSerializer(ModelSerializer):
    detail = serializers.SerializerMethodField(help_text="Safe details of the event.")

    class Meta:
        model = SagaEvent
        fields = ["kind", "step_index", "step_name", "detail", "created_at"]
        read_only_fields = fields

    @extend_schema_field({"type": "object", "additionalProperties": True})
    def get_detail(self, event: SagaEvent) -> dict[str, Any]:
        # An unexpected error's class and log reference are for staff, in the admin.
        return {k: v for k, v in (event.detail or {}).items() if k not in STAFF_ONLY_DETAIL}


class SagaSummarySerializer(ModelSerializer):
    """A saga in brief, as other resources (an order) link to it."""

    url = serializers.HyperlinkedIdentityField(view_name=SAGA_DETAIL, read_only=True)

    class Meta:
        model = Saga
        fields = ["id", "status", "url"]
        read_only_fields = fields


class ChildSerializer(ModelSerializer):
    """A child saga, as its parent lists it."""

    url = serializers.HyperlinkedIdentityField(view_name=SAGA_DETAIL, read_only=True)
    stage = serializers.IntegerField(
        source="parent_stage", read_only=True, help_text="The parent's stage that started it."
    )
    member = serializers.IntegerField(
        source="parent_member",
        read_only=True,
        allow_null=True,
        help_text="The position in its group of the parent's member that started it (the "
        "stage is a group), else null.",
    )

    class Meta:
        model = Saga
        fields = ["id", "name", "stage", "member", "status", "url"]
        read_only_fields = fields


class RepairSerializer(serializers.Serializer):
    action = serializers.CharField(help_text='What the repair runs: "compensate".')
    step = serializers.CharField(help_text="The step whose compensation it runs again.")
    note = serializers.CharField(help_text="What it will do, for the operator.")


class DiscrepancySerializer(serializers.Serializer):
    code = serializers.CharField(help_text="What disagrees (the check's identifier).")
    message = serializers.CharField(help_text="For an operator: what the check found.")
    repair = RepairSerializer(required=False, help_text="The repair it offers, if any.")


class ReconciliationSerializer(serializers.Serializer):
    status = serializers.ChoiceField(
        choices=Reconciliation.choices,
        help_text="What the last check found: `discrepant` sagas are flagged.",
    )
    checked_at = serializers.DateTimeField(
        allow_null=True, help_text="When the check last ran (null: never)."
    )
    discrepancies = DiscrepancySerializer(
        many=True, help_text="What the last check found, if the saga is flagged."
    )


class SagaSerializer(ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name=SAGA_DETAIL, read_only=True)
    key = serializers.CharField(
        source="business_key",
        read_only=True,
        allow_null=True,
        help_text="The business object the saga is about (its definition's `key`), if any.",
    )
    error = serializers.SerializerMethodField(help_text="Why the saga failed, if it did.")
    waiting = serializers.SerializerMethodField(
        help_text="While the saga waits: for what, since when and until when."
    )
    steps = SagaStepSerializer(many=True, read_only=True)
    reconciliation = serializers.SerializerMethodField(
        help_text="A final saga checked against the outside world (its definition's "
        "`reconcile`): what the last check found."
    )
    parent = serializers.PrimaryKeyRelatedField(
        read_only=True,
        allow_null=True,
        help_text="The saga that started this one as its child (a child stage or a group's "
        "child member), if any.",
    )
    children = ChildSerializer(
        many=True,
        read_only=True,
        help_text="The sagas its child stages (and its groups' child members) started, oldest "
        "first.",
    )

    class Meta:
        model = Saga
        fields = [
            "id",
            "url",
            "name",
            "key",
            "status",
            "current_step",
            "error",
            "waiting",
            "recovery_attempts",
            "created_at",
            "updated_at",
            "finished_at",
            "reconciliation",
            "parent",
            "children",
            "steps",
        ]
        read_only_fields = fields

    @extend_schema_field(ReconciliationSerializer)
    def get_reconciliation(self, saga: Saga) -> dict[str, Any]:
        found = {
            "status": saga.reconciliation,
            "checked_at": saga.reconciled_at,
            "discrepancies": saga.discrepancies or [],
        }
        return ReconciliationSerializer(found).data  # its time as the API writes times

    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(self, saga: Saga) -> dict[str, str] | None:
        return _error(saga)

    @extend_schema_field(WaitingSerializer(allow_null=True))
    def get_waiting(self, saga: Saga) -> dict[str, Any] | None:
        if saga.status != "waiting":
            return None
        # The steps are prefetched (`_with_steps`): no query per saga.
        step = next((s for s in saga.steps.all() if s.status == "waiting"), None)
        if step is None:
            return None
        waiting = {
            "stage": step.name,
            "kind": stage_kind(step),
            "event": step.definition.get("event"),
            "since": step.started_at,
            "until": step.due_at,
        }
        return WaitingSerializer(waiting).data


class SagaDetailSerializer(SagaSerializer):
    events = SagaEventSerializer(many=True, read_only=True, help_text="The timeline, oldest first.")

    class Meta(SagaSerializer.Meta):
        fields = [*SagaSerializer.Meta.fields, "events"]
        read_only_fields = fields


class PlanSerializer(serializers.Serializer):
    action = serializers.CharField(help_text="The operator action previewed.")
    allowed = serializers.BooleanField(help_text="Whether the saga's state allows it now.")
    reason = serializers.CharField(help_text="What it will do, or why it is not allowed.")
    run = serializers.ListField(
        child=serializers.CharField(), help_text="Steps it will run, in order."
    )
    undo = serializers.ListField(
        child=serializers.CharField(), help_text="Steps it will compensate, in order."
    )


class MemberQuerySerializer(serializers.Serializer):
    member = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=100_000,
        help_text="A group's stage: the position of one of its members.",
    )


class PlanQuerySerializer(serializers.Serializer):
    action = serializers.ChoiceField(
        choices=OperatorAction.choices, help_text="The action to preview."
    )
    index = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=32767,
        help_text="The step to resolve, skip or repair (required with those actions).",
    )
    member = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=100_000,
        help_text="With action=skip: the position of a failed member of the group at `index`.",
    )

    deadline = serializers.DateTimeField(
        required=False,
        allow_null=True,
        help_text=(
            "With action=retry: the deadline the retry would set (ISO 8601, in the future); "
            "empty: it would clear it."
        ),
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        needs_index = (OperatorAction.RESOLVE, OperatorAction.SKIP, OperatorAction.REPAIR)
        if attrs["action"] in needs_index and attrs.get("index") is None:
            raise serializers.ValidationError({"index": f"Required with action={attrs['action']}."})
        if "deadline" in attrs and attrs["action"] != OperatorAction.RETRY:
            raise serializers.ValidationError({"deadline": "Only with action=retry."})
        return attrs

    def validate_deadline(self, value: datetime.datetime | None) -> datetime.datetime | None:
        return future(value)


# The furthest a deadline may be set, as the admin's durations (`sagas.durations.LONGEST`).
FURTHEST = datetime.timedelta(days=100 * 365)


def future(value: datetime.datetime | None) -> datetime.datetime | None:
    """A deadline an operator gives: in the future, and within 100 years."""
    if value is None:
        return value
    now = timezone.now()
    if value <= now:
        raise serializers.ValidationError("Must be in the future.")
    if value - now > FURTHEST:
        raise serializers.ValidationError("At most 100 years from now.")
    return value


class RetryRequestSerializer(StrictSerializer):
    """An operator's retry: with no body, the saga's deadline is kept (one that passed while
    it waited is cleared). Whether a new deadline is still to come is checked when the retry
    acts (`future`), after its Idempotency-Key: a retry sent again once its deadline passed
    gets its first answer."""

    deadline = serializers.DateTimeField(
        required=False,
        allow_null=True,
        help_text=(
            "A new deadline for the saga (ISO 8601, in the future), or null to clear it; "
            "absent: kept, and cleared if it passed while the saga waited. Only for a saga "
            "going forward."
        ),
    )


class SkipRequestSerializer(StrictSerializer):
    """An operator marking a stage as done by hand (`sagas.services.saga_skip`)."""

    output = serializers.JSONField(
        required=False,
        allow_null=True,
        default=None,
        help_text="The stage's output, which later stages read (a wait's validator checks it).",
    )
    note = StrictCharField(
        max_length=1000,
        required=False,
        allow_blank=True,
        default="",
        help_text="Why, for the timeline.",
    )
    member = serializers.IntegerField(
        required=False,
        allow_null=True,
        default=None,
        min_value=0,
        max_value=100_000,
        help_text="A group's stage: the position of its failed member to mark as done (its "
        "`members[].position`); the group goes on once none of its members has failed.",
    )


class SignalFailureSerializer(StrictSerializer):
    code = serializers.RegexField(
        r"^[a-z0-9_]{1,100}$", help_text="A code for the failure, such as 3ds_failed."
    )
    message = serializers.CharField(max_length=500, help_text="What failed, for people.")


class SignalRequestSerializer(StrictSerializer):
    """A signal to a saga (`sagas.services.saga_signal`)."""

    event = StrictCharField(max_length=100, help_text="The event a wait of the saga waits for.")
    payload = serializers.JSONField(
        required=False, allow_null=True, help_text="What the event carries: the wait's output."
    )
    idempotency_key = StrictCharField(
        max_length=200,
        required=False,
        validators=[RegexValidator(r"^[\x21-\x7e]{1,200}\Z", "Printable ASCII, no spaces.")],
        help_text="Sent again with the same key, the signal gets its first answer.",
    )
    fail = SignalFailureSerializer(
        required=False, help_text="Fail the wait instead: a business failure of the saga."
    )


class DecisionRequestSerializer(StrictSerializer):
    """An approval's decision (`sagas.services.saga_approve`, `saga_reject`)."""

    note = StrictCharField(
        max_length=1000,
        required=False,
        allow_blank=True,
        default="",
        help_text="Why, for the timeline.",
    )
    stage = StrictCharField(
        max_length=100,
        required=False,
        help_text="The approval's name; by default the one the saga waits at.",
    )


class SignalSerializer(serializers.Serializer):
    """What became of a signal."""

    status = serializers.ChoiceField(
        choices=["consumed", "kept", "refused", "discarded"],
        help_text="consumed by its wait, kept for a wait to come, or refused (the wait is over).",
    )
    signal = serializers.IntegerField(source="signal_id", help_text="The signal's id.")
    stage = serializers.CharField(help_text="The wait it is for (when known).")
    reason = serializers.CharField(help_text="Why it was refused.")
    repeated = serializers.BooleanField(help_text="Its key was used before: the first answer.")


# -- bulk actions ---------------------------------------------------------------------------------


class BulkFilterSerializer(StrictSerializer):
    """Which sagas: every field given must match, and an empty filter matches every saga.
    Unknown fields are refused."""

    status = serializers.ChoiceField(
        choices=SagaStatus.choices, required=False, help_text="Only sagas in this status."
    )
    name = StrictCharField(
        max_length=100, required=False, help_text="Only sagas of this definition."
    )
    error_code = StrictCharField(
        max_length=100, required=False, help_text="Only sagas that failed with this error code."
    )
    failed_step = StrictCharField(
        max_length=100,
        required=False,
        help_text="Only sagas that stopped at the step of this name: it failed (or its "
        "compensation did), or it is in progress.",
    )
    created_from = serializers.DateTimeField(
        required=False, help_text="Only sagas created at or after this time (ISO 8601)."
    )
    created_before = serializers.DateTimeField(
        required=False, help_text="Only sagas created before this time."
    )
    updated_from = serializers.DateTimeField(
        required=False, help_text="Only sagas last updated at or after this time."
    )
    updated_before = serializers.DateTimeField(
        required=False, help_text="Only sagas last updated before this time."
    )
    business_key = StrictCharField(
        max_length=200,
        required=False,
        help_text="Only sagas with this business key (where sagas have one).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        problems = BulkFilter(**attrs).problems()
        if problems:
            raise ValidationError({field: [text] for field, text in problems.items()})
        return attrs


class BulkPreviewRequestSerializer(StrictSerializer):
    action = serializers.ChoiceField(
        choices=BulkOperation.choices, help_text="The action to take on every matching saga."
    )
    filter = BulkFilterSerializer(help_text="Which sagas.")
    stage = StrictCharField(
        max_length=100,
        required=False,
        help_text="With action=skip (required): the name of the stage to mark as done in each "
        "saga, or a group's failed member as `<group>.<member>`.",
    )
    output = serializers.JSONField(
        required=False,
        allow_null=True,
        help_text="With action=skip: the output each saga's stage is given (null if left out).",
    )
    note = StrictCharField(
        max_length=1000,
        required=False,
        allow_blank=True,
        help_text="With action=skip: why, on each saga's timeline.",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        skip = self.skip(attrs)
        if skip is None:
            given = [field for field in ("stage", "output", "note") if field in attrs]
            if given:
                raise ValidationError({field: ["Only with action=skip."] for field in given})
            return attrs
        problems = skip.problems()
        if problems:
            raise ValidationError({field: [text] for field, text in problems.items()})
        return attrs

    @staticmethod
    def skip(attrs: dict[str, Any]) -> BulkSkip | None:
        """A skip's stage, output and note; None for another action."""
        if attrs["action"] != BulkOperation.SKIP:
            return None
        return BulkSkip(attrs.get("stage", ""), attrs.get("output"), attrs.get("note", ""))


class BulkActionRequestSerializer(BulkPreviewRequestSerializer):
    expected_count = StrictIntegerField(
        required=False,
        min_value=0,
        max_value=2**31 - 1,
        help_text="The count of the preview you confirm: if the filter no longer matches as "
        "many sagas, nothing starts (409).",
    )


class PlanGroupSerializer(serializers.Serializer):
    name = serializers.CharField(help_text="The sagas' definition.")
    count = serializers.IntegerField(help_text="Sagas in the group.")
    allowed = serializers.BooleanField(
        source="plan.allowed", help_text="Whether their state allows the action now."
    )
    reason = serializers.CharField(
        source="plan.reason", help_text="What it will do, or why it will skip them."
    )
    run = serializers.ListField(
        source="plan.run", child=serializers.CharField(), help_text="Steps it will run, in order."
    )
    undo = serializers.ListField(
        source="plan.undo",
        child=serializers.CharField(),
        help_text="Steps it will compensate, in order.",
    )
    sample = serializers.ListField(
        child=serializers.UUIDField(), help_text="A few of the group's sagas, newest first."
    )


class BulkPreviewSerializer(serializers.Serializer):
    action = serializers.CharField(help_text="The action previewed.")
    count = serializers.IntegerField(help_text="Sagas the filter matches.")
    allowed = serializers.IntegerField(
        help_text="Of them, sagas the action will be taken on, as their plans stand now."
    )
    limit = serializers.IntegerField(help_text="The most sagas one bulk action takes.")
    groups = PlanGroupSerializer(
        many=True, help_text="Sagas with the same plan, those it allows first."
    )


class BulkSagaSerializer(serializers.Serializer):
    saga = serializers.UUIDField(source="saga_id", help_text="The saga.")
    reason = serializers.CharField(help_text="Why it was skipped, or how it failed.")


class BulkActionSerializer(ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name=BULK_ACTION_DETAIL, read_only=True)

    class Meta:
        model = BulkAction
        fields = [
            "id",
            "url",
            "action",
            "filter",
            "actor",
            "stage",
            "output",
            "note",
            "status",
            "total",
            "done",
            "skipped",
            "failed",
            "created_at",
            "started_at",
            "updated_at",
            "finished_at",
        ]
        read_only_fields = fields


class BulkActionDetailSerializer(BulkActionSerializer):
    skipped_sagas = serializers.SerializerMethodField(
        help_text="The sagas skipped because they changed since the bulk action started."
    )
    failed_sagas = serializers.SerializerMethodField(
        help_text="The sagas on which the action failed."
    )

    class Meta(BulkActionSerializer.Meta):
        fields = [*BulkActionSerializer.Meta.fields, "skipped_sagas", "failed_sagas"]
        read_only_fields = fields

    @extend_schema_field(BulkSagaSerializer(many=True))
    def get_skipped_sagas(self, bulk_action: BulkAction) -> list[dict[str, Any]]:
        return _sagas_with_outcome(bulk_action, BulkOutcome.SKIPPED)

    @extend_schema_field(BulkSagaSerializer(many=True))
    def get_failed_sagas(self, bulk_action: BulkAction) -> list[dict[str, Any]]:
        return _sagas_with_outcome(bulk_action, BulkOutcome.FAILED)


def _sagas_with_outcome(bulk_action: BulkAction, outcome: str) -> list[dict[str, Any]]:
    items = bulk_action.items.filter(outcome=outcome).order_by("id")
    return BulkSagaSerializer(items, many=True).data  # type: ignore[return-value]
