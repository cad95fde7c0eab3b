"""The saga API's serializers: sagas with their steps and timeline, plans, and errors."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..models import Saga, SagaEvent, SagaStep

# The URL name of a saga's detail endpoint: `sagas.urls` under its application namespace.
SAGA_DETAIL = "sagas:saga-detail"


class DetailSerializer(serializers.Serializer):
    """The body of an error response."""

    detail = serializers.CharField(help_text="What went wrong.")


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(help_text="A stable, machine-readable error code.")
    message = serializers.CharField(help_text="A safe, human-readable message.")


def _error(obj: Saga | SagaStep) -> dict[str, str] | None:
    if not obj.error_code and not obj.error_message:
        return None
    return {"code": obj.error_code, "message": obj.error_message}


class SagaStepSerializer(serializers.ModelSerializer):
    error = serializers.SerializerMethodField(help_text="Why the step failed, if it did.")

    class Meta:
        model = SagaStep
        fields = [
            "index",
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
    def get_error(self, step: SagaStep) -> dict[str, str] | None:
        return _error(step)


class SagaEventSerializer(serializers.ModelSerializer):
    class Meta:
        model = SagaEvent
        fields = ["kind", "step_index", "step_name", "detail", "created_at"]
        read_only_fields = fields


class SagaSummarySerializer(serializers.ModelSerializer):
    """A saga in brief, as other resources (an order) link to it."""

    url = serializers.HyperlinkedIdentityField(view_name=SAGA_DETAIL, read_only=True)

    class Meta:
        model = Saga
        fields = ["id", "status", "url"]
        read_only_fields = fields


class SagaSerializer(serializers.ModelSerializer):
    url = serializers.HyperlinkedIdentityField(view_name=SAGA_DETAIL, read_only=True)
    key = serializers.CharField(
        source="business_key",
        read_only=True,
        allow_null=True,
        help_text="The business object the saga is about (its definition's `key`), if any.",
    )
    error = serializers.SerializerMethodField(help_text="Why the saga failed, if it did.")
    steps = SagaStepSerializer(many=True, read_only=True)

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
            "recovery_attempts",
            "created_at",
            "updated_at",
            "finished_at",
            "steps",
        ]
        read_only_fields = fields

    @extend_schema_field(ErrorSerializer(allow_null=True))
    def get_error(self, saga: Saga) -> dict[str, str] | None:
        return _error(saga)


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


class PlanQuerySerializer(serializers.Serializer):
    action = serializers.ChoiceField(
        choices=["retry", "compensate", "resolve"], help_text="The action to preview."
    )
    index = serializers.IntegerField(
        required=False,
        min_value=0,
        max_value=32767,
        help_text="The step to resolve (required with action=resolve).",
    )

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["action"] == "resolve" and attrs.get("index") is None:
            raise serializers.ValidationError({"index": "Required with action=resolve."})
        return attrs
