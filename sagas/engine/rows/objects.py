"""The rows the engine reads and writes, as plain objects: a table's columns as attributes,
no queryset and no model instance on a step's hot path."""

from __future__ import annotations

from typing import Any, NamedTuple
from uuid import UUID

from ...models import FINAL_STATUSES, Direction, Saga, SagaStep


class SagaRow:
    """A saga's row (`sagas.models.Saga`'s columns)."""

    __slots__ = (
        "business_key",
        "created_at",
        "created_by_id",
        "current_step",
        "deadline_at",
        "definition_version",
        "direction",
        "epoch",
        "error_code",
        "error_message",
        "finished_at",
        "id",
        "idempotency_key",
        "input",
        "name",
        "options",
        "parent_id",
        "parent_member",
        "parent_stage",
        "recovery_attempts",
        "status",
        "trace_context",
        "updated_at",
    )
    model = Saga
    # The columns the engine never reads on a step's path: reconciliation's, of final sagas
    # (`sagas.engine.reconcile` reads them by a query of its own).
    unread = frozenset({"reconciliation", "reconciled_at", "discrepancies"})

    id: UUID
    name: str
    status: str
    direction: str
    epoch: int
    input: dict[str, Any]
    options: dict[str, Any]
    definition_version: str
    current_step: int
    error_code: str
    error_message: str
    idempotency_key: str | None
    business_key: str | None
    recovery_attempts: int
    parent_id: UUID | None
    parent_stage: int | None
    parent_member: int | None
    created_by_id: int | None
    deadline_at: Any
    trace_context: str
    created_at: Any
    updated_at: Any
    finished_at: Any

    @property
    def pk(self) -> UUID:
        return self.id

    @property
    def is_backward(self) -> bool:
        return self.direction == Direction.BACKWARD

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES


class StepRow:
    """A step's row (`sagas.models.SagaStep`'s columns); `definition` comes from the cache of
    its saga's definition version."""

    __slots__ = (
        "attempts",
        "compensated_at",
        "compensation_attempts",
        "definition",
        "due_at",
        "error_code",
        "error_message",
        "fenced_until",
        "finished_at",
        "id",
        "index",
        "name",
        "output",
        "saga_id",
        "started_at",
        "status",
    )
    model = SagaStep

    id: int
    saga_id: UUID
    index: int
    name: str
    status: str
    definition: dict[str, Any]
    attempts: int
    compensation_attempts: int
    output: Any
    error_code: str
    error_message: str
    started_at: Any
    finished_at: Any
    compensated_at: Any
    fenced_until: Any
    due_at: Any

    @property
    def pk(self) -> int:
        return self.id

    @property
    def compensation(self) -> str | None:
        return self.definition.get("compensation")


class EventRow(NamedTuple):
    """An event to insert (`sagas.models.SagaEvent`'s columns but its id)."""

    saga_id: Any
    step_index: int | None
    step_name: str
    kind: str
    detail: dict[str, Any]
    created_at: Any


Sql = tuple[str, list[Any]]
Row = SagaRow | StepRow
