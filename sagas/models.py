"""Saga instances, their step rows and the append-only event log: the source of truth."""

from __future__ import annotations

import copy
import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import F, Func, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce
from django.utils import timezone

from .definitions import KEY_MAX_LENGTH


class SagaStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running"
    WAITING = "waiting", "Waiting"
    COMPENSATING = "compensating", "Compensating"
    COMPLETED = "completed", "Completed"
    COMPENSATED = "compensated", "Compensated"
    FAILED = "failed", "Failed"


# A saga in one of these never changes again.
FINAL_STATUSES = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED)
# A saga in one of these waits for a worker (`failed` waits for an operator instead).
IN_FLIGHT = (SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.COMPENSATING)
# ... or, `waiting`, for a signal or a timeout: the sagas the sweeper looks at.
ACTIVE = (*IN_FLIGHT, SagaStatus.WAITING)
# The unique index of the definitions that allow one saga in flight per key.
ONE_IN_FLIGHT_PER_KEY = "saga_one_in_flight_per_key"
# The unique index of an operator request's key (`OperatorRequest`).
OPERATOR_REQUEST_ONCE = "operator_request_once"


class Direction(models.TextChoices):
    """Whether a saga runs its actions or undoes them. Once backward, it never turns back."""

    FORWARD = "forward", "Forward"
    BACKWARD = "backward", "Backward (compensating)"


class StepStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    RUNNING = "running", "Running (retrying)"
    WAITING = "waiting", "Waiting"
    COMPLETED = "completed", "Completed"
    FAILED = "failed", "Failed"
    COMPENSATING = "compensating", "To compensate"
    COMPENSATED = "compensated", "Compensated"
    COMPENSATION_FAILED = "compensation_failed", "Compensation failed"


class EventKind(models.TextChoices):
    SAGA_STARTED = "saga_started", "Saga started"
    STEP_COMPLETED = "step_completed", "Step completed"
    STEP_RETRYING = "step_retrying", "Step attempt failed, retrying"
    STEP_FAILED = "step_failed", "Step failed"
    SAGA_PAUSED = "saga_paused", "Saga paused for an operator"
    COMPENSATION_STARTED = "compensation_started", "Compensation started"
    STEP_COMPENSATED = "step_compensated", "Step compensated"
    COMPENSATION_RETRYING = "compensation_retrying", "Compensation attempt failed, retrying"
    COMPENSATION_FAILED = "compensation_failed", "Compensation failed"
    SAGA_COMPLETED = "saga_completed", "Saga completed"
    SAGA_COMPENSATED = "saga_compensated", "Saga compensated"
    SAGA_FAILED = "saga_failed", "Saga failed"
    OPERATOR_RETRY = "operator_retry", "Operator retried"
    OPERATOR_COMPENSATE = "operator_compensate", "Operator aborted (compensate)"
    OPERATOR_RESOLVE = "operator_resolve", "Operator resolved a step by hand"
    OPERATOR_SKIP = "operator_skip", "Operator marked a stage as done by hand"
    DUPLICATE_IGNORED = "duplicate_ignored", "Duplicate delivery ignored"
    RECOVERED = "recovered", "Recovered by the sweeper"
    DEADLINE_PASSED = "deadline_passed", "Deadline passed"
    WAIT_STARTED = "wait_started", "Wait started"
    WAIT_COMPLETED = "wait_completed", "Wait completed"
    WAIT_FAILED = "wait_failed", "Wait failed"
    WAIT_TIMED_OUT = "wait_timed_out", "Wait timed out"
    WAIT_SKIPPED = "wait_skipped", "Wait skipped (its condition was false)"
    SIGNAL_KEPT = "signal_kept", "Signal kept for a wait to come"
    SIGNAL_REFUSED = "signal_refused", "Signal refused"
    SIGNAL_DISCARDED = "signal_discarded", "Kept signal discarded"
    CHILD_STARTED = "child_started", "Child saga started"
    DISCREPANCY_FOUND = "discrepancy_found", "Reconciliation found discrepancies"
    DISCREPANCY_CLEARED = "discrepancy_cleared", "Reconciliation agrees again"
    RECONCILE_FAILED = "reconcile_failed", "Reconciliation check failed"
    REPAIR_REQUESTED = "repair_requested", "Operator repair requested"
    REPAIR_RAN = "repair_ran", "Operator repair ran"
    REPAIR_FAILED = "repair_failed", "Operator repair failed"


class Reconciliation(models.TextChoices):
    """What the last run of a final saga's reconciliation check found
    (`SagaDefinition.reconcile`)."""

    UNCHECKED = "unchecked", "Not checked"
    AGREES = "agrees", "Agrees with the world"
    DISCREPANT = "discrepant", "Discrepancies found"


def _status_check(name: str, choices: type[models.TextChoices]) -> models.CheckConstraint:
    return models.CheckConstraint(condition=Q(status__in=choices.values), name=name)


class Saga(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(
        "saga name", max_length=100, help_text="Name of the saga definition this instance runs."
    )
    status = models.CharField(
        max_length=20,
        choices=SagaStatus.choices,
        default=SagaStatus.PENDING,
        help_text="Where the saga is in its life cycle.",
    )
    direction = models.CharField(
        max_length=10,
        choices=Direction.choices,
        default=Direction.FORWARD,
        help_text="Forward (running its actions) or backward (compensating). A saga that "
        "began compensating stays backward: nothing runs forward after that.",
    )
    epoch = models.PositiveIntegerField(
        default=0,
        help_text="Generation of the saga's messages, raised whenever the engine sends a new "
        "chain; a message of an older generation does nothing.",
    )
    input = models.JSONField(help_text="The input the saga was started with.")
    options = models.JSONField(
        default=dict, help_text="Definition-level options, copied when the saga started."
    )
    definition_version = models.CharField(
        max_length=64,
        blank=True,
        help_text="Digest of the steps' definitions copied into the step rows: workers parse "
        "the definitions of a version once, not at every step.",
    )
    current_step = models.PositiveSmallIntegerField(
        default=0, help_text="Index of the step in progress, failed, or being compensated."
    )
    error_code = models.CharField(max_length=100, blank=True, help_text="Safe error code.")
    error_message = models.CharField(
        max_length=500, blank=True, help_text="Safe, human-readable error message."
    )
    # NULL, not "", for "no key": the unique constraint applies only to sagas that have one.
    idempotency_key = models.CharField(  # noqa: DJ001
        max_length=200,
        null=True,
        blank=True,
        help_text="Starting a saga again with the same name and key returns this one.",
    )
    # NULL, not "", for "no key": the index and the constraint leave such sagas out.
    business_key = models.CharField(  # noqa: DJ001
        "key",
        max_length=KEY_MAX_LENGTH,
        null=True,
        blank=True,
        help_text="The business object the saga is about (an order id), from its definition's "
        "key and its input, to find the sagas of an object.",
    )
    recovery_attempts = models.PositiveIntegerField(
        default=0,
        help_text="Recoveries by the sweeper since the saga last made progress; past "
        "SAGAS_RECOVERY_MAX_ATTEMPTS the saga fails for an operator.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,  # saga_created_by_idx, partial: most sagas are started by no user
        help_text="The user on whose behalf the saga was started, if any.",
    )
    deadline_at = models.DateTimeField(
        null=True, blank=True, help_text="Past this, a saga still running is compensated."
    )
    trace_context = models.CharField(
        max_length=200,
        blank=True,
        default="",
        help_text="The W3C traceparent of the saga's span (SAGAS_TRACING): its steps' and "
        "compensations' spans are its children, in whichever process they run.",
    )
    # A child saga's (`sagas.definitions.Child`): the saga that started it, and at which stage
    # (and which member of a group, when a group's member started it).
    parent = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="children",
        db_index=False,  # saga_parent_idx, partial: most sagas have none
        help_text="The saga that started this one as its child, if any.",
    )
    parent_stage = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="The parent's stage that started this child."
    )
    parent_member = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="The position of the parent's group member that started this child, if a "
        "group's member started it.",
    )
    # Reconciliation (`sagas.engine.reconcile`): what the last check of the final saga found.
    reconciliation = models.CharField(
        max_length=20,
        choices=Reconciliation.choices,
        default=Reconciliation.UNCHECKED,
        help_text="What the last reconciliation check found: discrepant sagas are flagged.",
    )
    reconciled_at = models.DateTimeField(
        null=True, blank=True, help_text="When the reconciliation check last ran on the saga."
    )
    discrepancies = models.JSONField(
        null=True,
        blank=True,
        help_text="The discrepancies the last check found (code, message, repair), if any.",
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When the saga was started.")
    updated_at = models.DateTimeField(auto_now=True, help_text="Last progress of the saga.")
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text="When the saga reached a final state."
    )

    class Meta:
        verbose_name = "saga"
        verbose_name_plural = "sagas"
        ordering = ("-created_at",)
        constraints = [
            _status_check("saga_status_valid", SagaStatus),
            models.CheckConstraint(
                condition=Q(direction__in=Direction.values), name="saga_direction_valid"
            ),
            models.UniqueConstraint(
                fields=["name", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="saga_unique_idempotency_key",
            ),
            # Definitions with `one_in_flight_per_key`: one unfinished saga per key.
            models.UniqueConstraint(
                fields=["name", "business_key"],
                condition=Q(options__one_in_flight_per_key=True)
                & Q(status__in=[s for s in SagaStatus.values if s not in FINAL_STATUSES]),
                name=ONE_IN_FLIGHT_PER_KEY,
            ),
        ]
        indexes = [
            # The sweeper's: the sagas in flight, a few among millions. On `status` alone, not
            # `updated_at`, which every step writes: a step's write that changes no indexed
            # column can be a HOT update (no index touched). The sweeper sorts the few it finds.
            models.Index(
                fields=["status"],
                condition=Q(status__in=[*ACTIVE]),
                name="saga_in_flight_idx",
            ),
            # The list of a status (the admin's filter, `GET /api/sagas/?status=`), newest first.
            models.Index(fields=["status", "-created_at"], name="saga_status_created_idx"),
            models.Index(fields=["name", "status"], name="saga_name_status_idx"),
            models.Index(fields=["-created_at"], name="saga_created_idx"),
            models.Index(
                fields=["business_key"],
                condition=Q(business_key__isnull=False),
                name="saga_business_key_idx",
            ),
            # A user's sagas (`GET /api/sagas/` for a user who sees only theirs; a user's
            # deletion, which clears `created_by`): sagas started without a user are left out.
            models.Index(
                fields=["created_by"],
                condition=Q(created_by__isnull=False),
                name="saga_created_by_idx",
            ),
            # The sweeper's: the sagas whose deadline passed, among those it may compensate
            # (a few, where millions wait or are finished; `sagas.engine.sweeper`).
            models.Index(
                fields=["deadline_at"],
                condition=Q(deadline_at__isnull=False)
                & Q(status__in=[SagaStatus.PENDING, SagaStatus.RUNNING, SagaStatus.WAITING]),
                name="saga_deadline_idx",
            ),
            # A parent's children (its page, its compensation, the sweeper's safety net).
            models.Index(
                fields=["parent", "parent_stage"],
                condition=Q(parent__isnull=False),
                name="saga_parent_idx",
            ),
            # Retention (sagas.retention): the oldest finished sagas of a status, first.
            # The flagged sagas (the admin's filter, the API's, the metric): few.
            models.Index(
                fields=["-finished_at"],
                condition=Q(reconciliation="discrepant"),
                name="saga_discrepant_idx",
            ),
            models.Index(
                fields=["status", "finished_at"],
                condition=Q(finished_at__isnull=False),
                name="saga_status_finished_idx",
            ),
        ]
        # The operator actions of the admin, each granted on its own.
        permissions = [
            ("retry_saga", "Can retry a failed saga"),
            ("compensate_saga", "Can compensate (abort) a saga"),
            ("resolve_saga", "Can resolve a step whose compensation failed"),
            ("signal_saga", "Can send a signal to a saga"),
            ("approve_saga", "Can approve or reject a saga's approval"),
            ("skip_saga", "Can mark a failed or waiting stage as done by hand"),
            ("reconcile_saga", "Can run a final saga's reconciliation check"),
            ("repair_saga", "Can run a repair a reconciliation check offers"),
        ]

    def __str__(self) -> str:
        return f"{self.name} {self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def is_backward(self) -> bool:
        return self.direction == Direction.BACKWARD


class DefinitionVersion(models.Model):
    """The stage definitions of a saga definition's version, stored once for every saga that
    starts from it: the saga names it (`Saga.definition_version`, a digest of them), and its
    stage rows hold no copy (`SagaStep.definition` reads it). Never changed nor deleted: a
    saga in flight runs the version it started with, whatever a deploy changes since."""

    digest = models.CharField(max_length=64, primary_key=True, help_text="Their digest.")
    name = models.CharField(max_length=100, help_text="The saga definition's name.")
    steps = models.JSONField(help_text="The stage definitions, in order.")
    created_at = models.DateTimeField(help_text="When a saga first started from it.")

    class Meta:
        verbose_name = "definition version"

    def __str__(self) -> str:
        return f"{self.name} {self.digest}"


# The stage definitions of each version this process has read (immutable, never deleted).
_versions: dict[str, list[dict[str, Any]]] = {}


def version_steps(digest: str) -> list[dict[str, Any]] | None:
    """The stage definitions of a definition version, read once per process; None if no such
    version is stored."""
    steps = _versions.get(digest)
    if steps is None:
        steps = (
            DefinitionVersion.objects.filter(digest=digest).values_list("steps", flat=True).first()
        )
        if steps is not None:
            _versions[digest] = steps
    return steps


def stage_definition() -> Coalesce:
    """A stage row's definition, in SQL: its own copy (sagas started before definitions were
    stored once, or made by hand), else its saga's version's entry. For `QuerySet.annotate()`
    or `alias()`, as `SagaStepQuerySet.with_definition()` does."""
    entry = (
        DefinitionVersion.objects.filter(digest=OuterRef("saga__definition_version"))
        .annotate(
            entry=Func(
                F("steps"),
                OuterRef("index"),
                template="(%(expressions)s)",
                arg_joiner=" -> ",
                output_field=models.JSONField(),
            )
        )
        .values("entry")[:1]
    )
    return Coalesce(F("stored_definition"), Subquery(entry), output_field=models.JSONField())


class SagaStepQuerySet(models.QuerySet["SagaStep"]):
    # Typed as Any: the type checker's plugin knows no annotation a method adds.
    def with_definition(self) -> Any:
        """Each row with its definition, as `stage_definition` (see `stage_definition`), for
        `values()` and lookups such as `KT("stage_definition__event")`."""
        return self.annotate(stage_definition=stage_definition())


class SagaStep(models.Model):
    # Not indexed on its own: the unique (saga, index) serves every lookup by saga.
    # No foreign-key constraint (`db_constraint`), for the check each row's insert would cost:
    # a saga's steps are inserted by the statement that inserts the saga, and deleted with it
    # (Django's cascade).
    saga = models.ForeignKey(
        Saga, on_delete=models.CASCADE, related_name="steps", db_index=False, db_constraint=False
    )
    index = models.PositiveSmallIntegerField(help_text="Position of the step in the saga.")
    name = models.CharField(max_length=100, help_text="Name of the step.")
    status = models.CharField(
        max_length=20,
        choices=StepStatus.choices,
        default=StepStatus.PENDING,
        help_text="Where the step is in its life cycle.",
    )
    # NULL where the saga's definition version is stored (`DefinitionVersion`): read through
    # `definition`, or `SagaStepQuerySet.with_definition()` in a query.
    stored_definition = models.JSONField(
        null=True,
        blank=True,
        db_column="definition",
        help_text="The stage's definition copied into its row (sagas started before "
        "definitions were stored once per version); else empty, and read from its saga's "
        "definition version.",
    )
    attempts = models.PositiveIntegerField(
        default=0,
        help_text="Failed or completed attempts of the action, counted from its rows: its retry "
        "budget. An operator's retry starts it afresh.",
    )
    compensation_attempts = models.PositiveIntegerField(
        default=0, help_text="Attempts of the compensation."
    )
    output = models.JSONField(null=True, blank=True, help_text="What the action returned.")
    error_code = models.CharField(max_length=100, blank=True, help_text="Safe error code.")
    error_message = models.CharField(
        max_length=500, blank=True, help_text="Safe, human-readable error message."
    )
    started_at = models.DateTimeField(null=True, blank=True, help_text="First attempt started.")
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text="When the action completed or finally failed."
    )
    compensated_at = models.DateTimeField(
        null=True, blank=True, help_text="When the compensation completed."
    )
    due_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A wait's timeout: when it ends if no signal came (set while it waits).",
    )
    fenced_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="An attempt of the step's action may still be running until then (on the "
        "database's clock): its compensation waits. Set when the saga turns back while the "
        "step is in progress outside an attempt of its own.",
    )

    objects = SagaStepQuerySet.as_manager()

    class Meta:
        verbose_name = "saga step"
        verbose_name_plural = "saga steps"
        ordering = ("saga", "index")
        constraints = [
            _status_check("saga_step_status_valid", StepStatus),
            models.UniqueConstraint(fields=["saga", "index"], name="saga_step_unique_index"),
        ]
        indexes = [
            # The waker's: the waits whose timeout is due, a few among millions of steps (a
            # wait's end clears its `due_at`). Not `WHERE status = 'waiting'`: a column in an
            # index's predicate blocks HOT updates as an indexed column does, whatever the
            # values, and every step's write changes `status`.
            models.Index(
                fields=["due_at"],
                condition=Q(due_at__isnull=False),
                name="saga_step_due_at_idx",
            ),
        ]
        # No index on `status` (nor a predicate on it): nothing looks steps up by it, and every
        # step's write changes it; a step's write then can be a HOT update.

    def __str__(self) -> str:
        return f"{self.index}:{self.name} ({self.status})"

    @property
    def definition(self) -> Any:  # a dict, typed as the JSON field it stands for
        """The stage's action, compensation and policy as the saga started with them: the row's
        copy, else its saga's definition version's (a copy of its own, free to change)."""
        if self.stored_definition is not None:
            return self.stored_definition
        if "stage_definition" in self.__dict__:  # annotated (`with_definition`)
            return self.__dict__["stage_definition"]
        steps = version_steps(self.saga.definition_version)
        if steps is None:
            raise DefinitionVersion.DoesNotExist(
                f"saga {self.saga_id}: no definition version {self.saga.definition_version!r}"
            )
        definition = copy.deepcopy(steps[self.index])
        self.__dict__["stage_definition"] = definition
        return definition

    @definition.setter
    def definition(self, value: dict[str, Any]) -> None:
        """Give the row a copy of its own (the engine reads it instead of the version's)."""
        self.stored_definition = value
        self.__dict__.pop("stage_definition", None)

    @property
    def compensation(self) -> str | None:
        return self.definition.get("compensation")


class SagaMember(models.Model):
    """A member of a group stage (`sagas.definitions.Group`): a step that runs at the same time
    as the group's other members, with its own status, attempts and output. Made when its
    group begins (a map's: one per item, with the item). Its definition is in the group's
    stage row (`SagaStep.definition`), not here."""

    # Not indexed on its own: the unique (saga, stage, position) serves every lookup by saga.
    # Inserted under the saga's row lock (see `SagaEvent.saga`): no foreign-key check.
    saga = models.ForeignKey(
        Saga, on_delete=models.CASCADE, related_name="members", db_index=False, db_constraint=False
    )
    stage = models.PositiveSmallIntegerField(help_text="The index of its group's stage.")
    position = models.PositiveIntegerField(help_text="Its place in the group (an item's index).")
    name = models.CharField(
        max_length=100, help_text="Its name in the group (a map's member: its item's key)."
    )
    item = models.JSONField(null=True, blank=True, help_text="A map's member: its item.")
    status = models.CharField(
        max_length=20,
        choices=StepStatus.choices,
        default=StepStatus.PENDING,
        help_text="Where the member is in its life cycle.",
    )
    attempts = models.PositiveIntegerField(
        default=0, help_text="Failed or completed attempts of its action, counted from its row."
    )
    epoch = models.PositiveIntegerField(
        default=0,
        help_text="The saga's epoch when the member was last sent: its task's error callback "
        "of an older one does nothing.",
    )
    compensation_attempts = models.PositiveIntegerField(
        default=0, help_text="Attempts of its compensation."
    )
    output = models.JSONField(null=True, blank=True, help_text="What its action returned.")
    error_code = models.CharField(max_length=100, blank=True, help_text="Safe error code.")
    error_message = models.CharField(
        max_length=500, blank=True, help_text="Safe, human-readable error message."
    )
    started_at = models.DateTimeField(null=True, blank=True, help_text="First attempt started.")
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text="When its action completed or finally failed."
    )
    compensated_at = models.DateTimeField(
        null=True, blank=True, help_text="When its compensation completed."
    )
    fenced_until = models.DateTimeField(
        null=True,
        blank=True,
        help_text="An attempt of its action may still be running until then: its compensation "
        "waits (as a step's, `SagaStep.fenced_until`).",
    )

    class Meta:
        verbose_name = "group member"
        verbose_name_plural = "group members"
        # By the saga's id, not its row: ordering by `saga` would join (and lock) the saga.
        ordering = ("saga_id", "stage", "position")
        constraints = [
            _status_check("saga_member_status_valid", StepStatus),
            models.UniqueConstraint(
                fields=["saga", "stage", "position"], name="saga_member_unique_position"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.stage}.{self.position}:{self.name} ({self.status})"

    # The engine reads a member as it reads a step (`sagas.engine.groups.load`): its stage's
    # index, its definition (from the group's row) and its group's name.
    definition: dict[str, Any]
    group: str

    @property
    def index(self) -> int:
        return self.stage

    @property
    def compensation(self) -> str | None:
        return self.definition.get("compensation")

    @property
    def label(self) -> str:
        """Its step's name on the timeline, in metrics and traces: `<group>.<member>` (a map's
        member: `<group>.<step>`, the same for every item; its item's key is in the event's
        detail, `member`)."""
        return f"{getattr(self, 'group', self.stage)}.{self.definition['name']}"[:100]

    @property
    def title(self) -> str:
        """Its name for a person: `<group>.<member>` (a map's member: `<group>.<item key>`)."""
        return f"{getattr(self, 'group', self.stage)}.{self.name}"


# Keys of an event's detail that only staff see: an unexpected error's class, its message where
# the project says it is safe, and the reference of the worker's log record.
STAFF_ONLY_DETAIL = frozenset({"exception", "exception_message", "reference"})


class SagaEvent(models.Model):
    # Not indexed on its own: saga_event_saga_idx (saga, id) serves every lookup by saga.
    # No foreign-key constraint (`db_constraint`), for the check each event's insert would
    # cost (a statement each): the engine inserts events under the saga's row lock, which no
    # deletion passes (a purge locks the saga FOR UPDATE); they go with their saga (Django's
    # cascade).
    saga = models.ForeignKey(
        Saga, on_delete=models.CASCADE, related_name="events", db_index=False, db_constraint=False
    )
    step_index = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="The step the event is about, if any."
    )
    step_name = models.CharField(max_length=100, blank=True, help_text="Name of that step.")
    kind = models.CharField(max_length=40, choices=EventKind.choices, help_text="What happened.")
    detail = models.JSONField(default=dict, blank=True, help_text="Safe details of the event.")
    created_at = models.DateTimeField(help_text="When it happened.")

    class Meta:
        verbose_name = "saga event"
        verbose_name_plural = "saga events"
        ordering = ("saga", "id")
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=EventKind.values), name="saga_event_kind_valid"
            )
        ]
        indexes = [models.Index(fields=["saga", "id"], name="saga_event_saga_idx")]

    def __str__(self) -> str:
        return f"{self.kind} {self.step_name}".strip()


class SignalStatus(models.TextChoices):
    KEPT = "kept", "Kept for a wait to come"
    CONSUMED = "consumed", "Consumed by its wait"
    REFUSED = "refused", "Refused"
    DISCARDED = "discarded", "Discarded (no wait consumed it)"


class SagaSignal(models.Model):
    """An event sent to a saga (`sagas.services.saga_signal`): a stored fact, kept until its
    wait consumes it, refused when its wait is over, discarded when the saga ends without it.
    Its idempotency key makes a repeated signal get the first answer and do nothing more."""

    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="signals")
    event = models.CharField(max_length=100, help_text="The event's name, as its wait names it.")
    payload = models.JSONField(null=True, blank=True, help_text="What the event carries.")
    fail = models.JSONField(
        null=True, blank=True, help_text="The error of a signal that fails its wait."
    )
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    status = models.CharField(max_length=20, choices=SignalStatus.choices)
    stage = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="The wait that consumed it."
    )
    reason = models.CharField(max_length=300, blank=True, help_text="Why it was refused.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "saga signal"
        constraints = [
            _status_check("saga_signal_status_valid", SignalStatus),
            models.UniqueConstraint(
                fields=["saga", "idempotency_key"],
                condition=Q(idempotency_key__isnull=False),
                name="saga_signal_once",
            ),
        ]
        indexes = [
            # A wait's kept signals, looked up when the saga reaches it.
            models.Index(
                fields=["saga", "event"],
                condition=Q(status=SignalStatus.KEPT),
                name="saga_signal_kept_idx",
            )
        ]

    def __str__(self) -> str:
        return f"{self.event} ({self.status})"


class SagaNotice(models.Model):
    """The signals a committed transition owes (the outbox): written in the transition's
    transaction when one of its events has a receiver, and deleted once they are sent. One
    still here after `SAGAS_RELAY_AFTER` was never sent (its process died after the commit, or
    the COMMIT's answer was lost): the relay sends it (`sagas.engine.relay`)."""

    # Written with its events (see `SagaEvent.saga`): no foreign-key check.
    saga = models.ForeignKey(Saga, on_delete=models.CASCADE, related_name="+", db_constraint=False)
    first_event_id = models.BigIntegerField(help_text="The transition's first event.")
    last_event_id = models.BigIntegerField(help_text="The transition's last event.")
    # Written by the engine's statement with `clock_timestamp()`, next to its COMMIT: the
    # transaction's own start (`now()`) would make a long one's notice look old at once.
    created_at = models.DateTimeField(
        help_text="When it was written, or last claimed by the relay."
    )

    class Meta:
        verbose_name = "saga notice"

    def __str__(self) -> str:
        return f"events {self.first_event_id}-{self.last_event_id} of {self.saga_id}"


# -- bulk actions: an operator action on every saga that matches a filter -----------------------


class OperatorAction(models.TextChoices):
    """The operator actions, each gated by a custom permission of `Saga` (see its Meta):
    `sagas.retry_saga`, `sagas.compensate_saga`, `sagas.resolve_saga`."""

    RETRY = "retry", "Retry"
    COMPENSATE = "compensate", "Compensate"
    RESOLVE = "resolve", "Resolve"
    SKIP = "skip", "Skip"
    RECONCILE = "reconcile", "Reconcile"
    REPAIR = "repair", "Repair"


class BulkOperation(models.TextChoices):
    """The operator actions a bulk action can take (resolve is one step's, never in bulk)."""

    RETRY = OperatorAction.RETRY.value, OperatorAction.RETRY.label
    COMPENSATE = OperatorAction.COMPENSATE.value, OperatorAction.COMPENSATE.label
    #: Mark the stage of one name as done in every saga, with one output (`BulkAction.stage`).
    SKIP = OperatorAction.SKIP.value, OperatorAction.SKIP.label
    #: Run each final saga's reconciliation check now.
    RECONCILE = OperatorAction.RECONCILE.value, OperatorAction.RECONCILE.label


class BulkActionStatus(models.TextChoices):
    PENDING = "pending", "Waiting for a worker"
    RUNNING = "running", "Running"
    COMPLETED = "completed", "Completed"


class BulkOutcome(models.TextChoices):
    PENDING = "pending", "To do"
    DONE = "done", "Done"
    SKIPPED = "skipped", "Skipped"
    FAILED = "failed", "Failed"


class BulkAction(models.Model):
    """Retry or compensate every saga that matched a filter, or mark a stage of each as done,
    worked through in batches."""

    action = models.CharField(
        max_length=20, choices=BulkOperation.choices, help_text="The action taken on each saga."
    )
    filter = models.JSONField(
        help_text="The filter the sagas matched (`sagas.bulk.BulkFilter`); each saga must "
        "still match it when its batch reaches it."
    )
    actor = models.CharField(
        max_length=150, help_text="The operator's username, recorded in each saga's timeline."
    )
    # A skip's only: which stage, with what output, and why. NULL, not "", for the other
    # actions: the check constraint says that a skip, and only a skip, names its stage.
    stage = models.CharField(  # noqa: DJ001
        max_length=100,
        null=True,
        blank=True,
        help_text="A skip's: the name of the stage marked as done in each saga.",
    )
    output = models.JSONField(
        null=True,
        blank=True,
        help_text="A skip's: the output each saga's stage is given (the same for every saga).",
    )
    note = models.CharField(  # noqa: DJ001
        max_length=1000,
        null=True,
        blank=True,
        help_text="A skip's: why, on each saga's timeline.",
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The operator who started it.",
    )
    status = models.CharField(
        max_length=20,
        choices=BulkActionStatus.choices,
        default=BulkActionStatus.PENDING,
        help_text="Waiting for its first batch, running, or completed.",
    )
    batch_size = models.PositiveIntegerField(
        help_text="Sagas acted on per task message (SAGAS_BULK_BATCH_SIZE when it started)."
    )
    total = models.PositiveIntegerField(
        default=0, help_text="Sagas that matched the filter when the bulk action started."
    )
    done = models.PositiveIntegerField(default=0, help_text="Sagas the action was taken on.")
    skipped = models.PositiveIntegerField(
        default=0,
        help_text="Sagas that changed since: no longer matching the filter, no longer allowed "
        "by their plan, busy, or gone.",
    )
    failed = models.PositiveIntegerField(
        default=0, help_text="Sagas on which the action failed with an unexpected error."
    )
    created_at = models.DateTimeField(auto_now_add=True, help_text="When it was started.")
    started_at = models.DateTimeField(
        null=True, blank=True, help_text="When a worker took its first batch."
    )
    updated_at = models.DateTimeField(
        auto_now=True, help_text="Last progress: the sweeper sends a stalled one again."
    )
    finished_at = models.DateTimeField(
        null=True, blank=True, help_text="When every saga had its outcome."
    )

    class Meta:
        verbose_name = "bulk action"
        verbose_name_plural = "bulk actions"
        ordering = ("-created_at",)
        constraints = [
            _status_check("bulk_action_status_valid", BulkActionStatus),
            models.CheckConstraint(
                condition=Q(action__in=BulkOperation.values), name="bulk_action_action_valid"
            ),
            # A skip names its stage; the other actions have none.
            models.CheckConstraint(
                condition=(Q(action=BulkOperation.SKIP) & Q(stage__isnull=False))
                | (~Q(action=BulkOperation.SKIP) & Q(stage__isnull=True)),
                name="bulk_action_skip_stage",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "updated_at"], name="bulk_action_status_idx"),
        ]

    def __str__(self) -> str:
        return f"Bulk {self.action} {self.pk} ({self.status})"

    @property
    def is_finished(self) -> bool:
        return self.status == BulkActionStatus.COMPLETED

    @property
    def processed(self) -> int:
        return self.done + self.skipped + self.failed


class BulkActionItem(models.Model):
    """One saga of a bulk action and what became of it: the list of its sagas, and the record
    that makes acting on each exactly once (written in the same transaction as the action)."""

    bulk_action = models.ForeignKey(BulkAction, on_delete=models.CASCADE, related_name="items")
    # An id, not a foreign key: the record outlives a saga deleted later.
    saga_id = models.UUIDField(help_text="The saga.")
    outcome = models.CharField(
        max_length=20,
        choices=BulkOutcome.choices,
        default=BulkOutcome.PENDING,
        help_text="To do, done, skipped or failed.",
    )
    reason = models.CharField(
        max_length=500, blank=True, help_text="What was done, or why the saga was skipped."
    )

    class Meta:
        verbose_name = "bulk action saga"
        verbose_name_plural = "bulk action sagas"
        ordering = ("bulk_action", "id")
        constraints = [
            models.CheckConstraint(
                condition=Q(outcome__in=BulkOutcome.values), name="bulk_item_outcome_valid"
            ),
            models.UniqueConstraint(
                fields=["bulk_action", "saga_id"], name="bulk_item_unique_saga"
            ),
        ]
        indexes = [
            models.Index(fields=["bulk_action", "outcome", "id"], name="bulk_item_outcome_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.saga_id} ({self.outcome})"


class OperatorRequest(models.Model):
    """An operator's action taken once per key: an API request's `Idempotency-Key`, or the
    one-time token of an admin confirmation page. Sent again (its answer was lost), it gets
    the first answer and does nothing more. Written in the action's transaction."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    key = models.CharField(max_length=120, help_text="The Idempotency-Key, or admin:<token>.")
    path = models.CharField(max_length=300, help_text="The request's path: one key, one action.")
    status_code = models.PositiveSmallIntegerField(null=True, help_text="The first answer's.")
    body = models.JSONField(null=True, help_text="The first answer's body (the API's).")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "operator request"
        constraints = [
            models.UniqueConstraint(fields=["user", "key"], name=OPERATOR_REQUEST_ONCE),
        ]

    def __str__(self) -> str:
        return f"{self.key} ({self.path})"
