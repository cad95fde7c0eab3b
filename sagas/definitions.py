"""The declarative definition API: a saga is a name and an ordered list of stages: steps, waits
for an event or a time, and groups of steps that run at the same time."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any, Literal
from uuid import UUID

from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string

from .exceptions import CodeMissing, DefinitionError, SagaKeyError

OnExhausted = Literal["compensate", "pause"]
# What an exception the step did not declare (a bug: `KeyError`, `TypeError`) does: pause the
# saga for an operator, compensate it, or retry the step as if the error were transient.
OnUnexpectedError = Literal["pause", "compensate", "retry"]
UNEXPECTED_ERROR_POLICIES = ("pause", "compensate", "retry")
# The longest business key a saga stores (`Saga.business_key`).
KEY_MAX_LENGTH = 200

_registry: dict[str, SagaDefinition] = {}


@dataclass(frozen=True)
class StepContext:
    """What an action or a compensation receives."""

    saga_id: UUID
    step: str
    input: dict[str, Any]
    outputs: dict[str, Any]
    attempt: int
    output: Any = None  # the step's own output, for its compensation
    # A group member's: the item of the list its group maps over (None for a listed member).
    item: Any = None
    # A group member's: the group's name (the member's own name is `step`).
    group: str = ""

    @property
    def idempotency_key(self) -> str:
        """Pass this to any external system, so a repeated call is recognised as such:
        `<saga>:<step>`, and for a group's member `<saga>:<group>:<member>` (a map's member
        is named by its item's key)."""
        if self.group:
            return f"{self.saga_id}:{self.group}:{self.step}"
        return f"{self.saga_id}:{self.step}"

    def signal_url(self, event: str) -> str:
        """The signed URL at which an external system sends `event` to this saga's wait
        (a POST of the payload as JSON), on `SAGAS_BASE_URL`: make it before the wait begins
        and hand it over (a payment provider's webhook URL). See `sagas.signing`."""
        from .signing import signal_url

        return signal_url(self.saga_id, event)

    def approval_url(self, approval: str, approver: str = "") -> str:
        """The signed link to the approver's page of this saga's `approval` (the stage's
        name), on `SAGAS_BASE_URL`, expiring after `SAGAS_APPROVAL_LINK_MAX_AGE`: send it to
        `approver` (whom the timeline names when the link alone is the credential)."""
        from .signing import approval_url

        return approval_url(self.saga_id, approval, approver)


def dotted_path(target: str | Callable[..., Any] | type) -> str:
    """The import path of a callable or class, so it can be stored in a step row."""
    if isinstance(target, str):
        return target
    return f"{target.__module__}.{target.__qualname__}"


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how fast a failing action is tried again.

    Only exceptions listed in `transient` are retried (subclasses of `TransientError` always
    are); the delay before try n is `backoff * 2**(n-1)`, capped at `backoff_max`, with full
    jitter so that many sagas failing together do not retry together.
    """

    max_attempts: int = 3
    backoff: float = 0.5
    backoff_max: float = 60.0
    jitter: bool = True
    # Exception classes or their import paths; stored as paths.
    transient: tuple[str | type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise DefinitionError("max_attempts must be at least 1")
        if self.backoff < 0 or self.backoff_max < self.backoff:
            raise DefinitionError("backoff must be >= 0 and backoff_max >= backoff")
        object.__setattr__(self, "transient", tuple(dotted_path(t) for t in self.transient))

    def countdown(self, attempt: int) -> float:
        """Seconds to wait after the given (1-based) failed attempt."""
        delay = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return random.uniform(0, delay) if self.jitter else delay

    def longest_wait(self) -> float:
        return min(self.backoff_max, self.backoff * 2 ** max(self.max_attempts - 2, 0))

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["transient"] = list(self.transient)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetryPolicy:
        return cls(**{**data, "transient": tuple(data.get("transient", ()))})


DEFAULT_COMPENSATION_RETRY = RetryPolicy(max_attempts=8, backoff=1.0, backoff_max=120.0)


@dataclass(frozen=True)
class Step:
    """One step: an action, its compensation and its policy.

    `action(ctx)` returns a JSON-serialisable output; `compensation(ctx)` undoes it, reading
    `ctx.output`. `on_exhausted` says what happens when transient retries run out: compensate
    the saga, or pause it (status failed) for an operator. A completed `pivot` step is the point
    of no return: later failures pause instead of compensating.

    `compensate_failed_step` is for actions that may have half-happened (an external call made,
    then the attempt failed or was interrupted before its commit): when the saga compensates,
    this step is compensated too whenever it may have started, that is when it failed or is
    the step in progress, whatever its row says. Its compensation then gets `ctx.output=None`
    and must tolerate that nothing happened (find the effect by `ctx.idempotency_key`).

    `time_limit` bounds an attempt of the action, `compensation_time_limit` one of the
    compensation (default: the same): past it the attempt gets `SoftTimeLimitExceeded` and
    is retried; one that ignores it is killed `SAGAS_HARD_TIME_LIMIT_GRACE` seconds later, and
    that counts as a failed attempt too.

    `on_unexpected_error` says what an exception the step did not declare does (neither a
    `StepError` nor listed in `retry.transient`: a bug, such as a `KeyError`): `"pause"` the
    saga for an operator, who fixes the code, deploys and retries; `"compensate"` it, as a
    business error would; or `"retry"` the step as if the error were transient (then
    `on_exhausted` decides). None: the definition's, else `SAGAS_ON_UNEXPECTED_ERROR`, else
    `"pause"`: a bug never undoes completed work unless you say so.
    """

    name: str
    action: str | Callable[..., Any]
    compensation: str | Callable[..., Any] | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    compensation_retry: RetryPolicy = DEFAULT_COMPENSATION_RETRY
    time_limit: int = 60
    on_exhausted: OnExhausted = "compensate"
    pivot: bool = False
    compensate_failed_step: bool = False
    # Seconds a compensation may run (its own soft limit; the hard kill comes
    # SAGAS_HARD_TIME_LIMIT_GRACE later); None: the step's `time_limit`.
    compensation_time_limit: int | None = None
    on_unexpected_error: OnUnexpectedError | None = None

    def __post_init__(self) -> None:
        if self.on_exhausted not in ("compensate", "pause"):
            raise DefinitionError(f"step {self.name!r}: on_exhausted must be compensate or pause")
        if self.on_unexpected_error not in (None, *UNEXPECTED_ERROR_POLICIES):
            raise DefinitionError(
                f"step {self.name!r}: on_unexpected_error must be pause, compensate or retry"
            )
        if self.time_limit < 1:
            raise DefinitionError(f"step {self.name!r}: time_limit must be at least 1 second")
        if self.compensation_time_limit is not None and self.compensation_time_limit < 1:
            raise DefinitionError(
                f"step {self.name!r}: compensation_time_limit must be at least 1 second"
            )
        object.__setattr__(self, "action", dotted_path(self.action))
        if self.compensation is not None:
            object.__setattr__(self, "compensation", dotted_path(self.compensation))

    def snapshot(self, on_unexpected_error: str | None = None) -> dict[str, Any]:
        """What a saga copies into its step row when it starts; `on_unexpected_error` is the
        definition's, for a step that sets none."""
        policy = self.on_unexpected_error or on_unexpected_error
        # Stored only when set, so that a row holds no key that says nothing.
        unexpected = {"on_unexpected_error": policy} if policy else {}
        return {
            "action": self.action,
            "compensation": self.compensation,
            "retry": self.retry.as_dict(),
            "compensation_retry": self.compensation_retry.as_dict(),
            "time_limit": self.time_limit,
            "compensation_time_limit": self.compensation_time_limit or self.time_limit,
            "on_exhausted": self.on_exhausted,
            "pivot": self.pivot,
            "compensate_failed_step": self.compensate_failed_step,
            **unexpected,
        }


OnTimeout = Literal["compensate", "pause", "continue"]
# The largest payload a signal may carry by default (its JSON, in bytes).
PAYLOAD_MAX_BYTES = 65_536


@dataclass(frozen=True)
class Wait:
    """A stage that waits for an event from outside, or for a time, holding no worker.

    With `event`, the saga waits until a signal of that name comes (`sagas.services.saga_signal`,
    or the API), and the signal's payload is the wait's output, which later steps read in
    `ctx.outputs[name]` (and compensations too). A signal sent before the saga reaches the wait
    is kept until it does. Without `event`, it is a timer: it waits `timeout` seconds and
    goes on.

    `timeout` (seconds) bounds the wait; when it passes, `on_timeout` says what the saga does:
    `"compensate"` (the default for an event: as a business failure of the wait), `"pause"`
    for an operator (whose retry waits again, with a new timeout), or `"continue"` without the
    event (the output is None; a timer's only choice). `validate(payload)`, optional, raises
    Django's `ValidationError` for a payload it refuses: the signal is refused, and the wait
    goes on waiting. `max_payload_bytes` bounds a payload's JSON.

    `until(ctx)`, instead of `timeout`, computes the due time from the saga's context (its
    input and the outputs so far): an aware `datetime`, or None for no timeout (a timer
    needs one). `condition(ctx)`, optional, decides whether the saga waits at all: when it
    returns false the wait is skipped (completed with no output) and the saga goes on. Both
    run in the transaction that ends the stage before, under the saga's lock: keep them
    quick, and give them as importable functions (their paths are stored).
    """

    name: str
    event: str | None = None
    timeout: float | None = None
    on_timeout: OnTimeout | None = None
    validate: str | Callable[..., Any] | None = None
    max_payload_bytes: int = PAYLOAD_MAX_BYTES
    until: str | Callable[..., Any] | None = None
    condition: str | Callable[..., Any] | None = None
    # An approval (`Approval`): a person's decision, taken only through approve and reject.
    approval: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.event is not None and (not self.event or len(self.event) > 100):
            raise DefinitionError(f"wait {self.name!r}: event must have 1 to 100 characters")
        if self.timeout is not None and self.until is not None:
            raise DefinitionError(f"wait {self.name!r}: give a timeout or until, not both")
        if self.timeout is None and self.until is None and self.event is None:
            raise DefinitionError(f"wait {self.name!r}: a timer needs a timeout or until")
        if self.timeout is not None and not 0 < self.timeout <= 100 * 365 * 86400:
            raise DefinitionError(f"wait {self.name!r}: timeout must be within (0, 100 years]")
        on_timeout = self.on_timeout or ("compensate" if self.event else "continue")
        if on_timeout not in ("compensate", "pause", "continue"):
            raise DefinitionError(
                f"wait {self.name!r}: on_timeout must be compensate, pause or continue"
            )
        if self.event is None and on_timeout != "continue":
            raise DefinitionError(f"wait {self.name!r}: a timer can only continue")
        object.__setattr__(self, "on_timeout", on_timeout)
        if self.max_payload_bytes < 2:
            raise DefinitionError(f"wait {self.name!r}: max_payload_bytes must be at least 2")
        for attribute in ("validate", "until", "condition"):
            value = getattr(self, attribute)
            if value is not None:
                path = dotted_path(value)
                if "<" in path:  # a lambda or a nested function: no path to import it by
                    raise DefinitionError(
                        f"wait {self.name!r}: {attribute} must be a module-level function"
                    )
                object.__setattr__(self, attribute, path)

    def snapshot(self, on_unexpected_error: str | None = None) -> dict[str, Any]:
        """What a saga copies into the wait's row when it starts."""
        snapshot: dict[str, Any] = {
            "kind": "wait",
            "event": self.event,
            "timeout": self.timeout,
            "on_timeout": self.on_timeout,
            "validate": self.validate,
            "max_payload_bytes": self.max_payload_bytes,
            # What the engine reads of every stage: a wait runs no action and undoes nothing.
            "compensation": None,
            "time_limit": 1,
            "pivot": False,
        }
        # Only when set, so that the waits of earlier versions keep their digest.
        for attribute in ("until", "condition", "approval"):
            if getattr(self, attribute):
                snapshot[attribute] = getattr(self, attribute)
        return snapshot


@dataclass(frozen=True)
class Approval(Wait):
    """A wait for a person's decision: approved, the saga goes on (the wait's output is
    `{"decision": "approved", "by": ..., "note": ...}`); rejected, the wait fails as a business
    failure, and the saga compensates. Decided from the admin, the API (`approve`, `reject`)
    or an approver's signed link (`sagas.signing.approval_url`), by a user with
    `sagas.approve_saga`; never by a plain signal. Its event is its name, unless given.
    `timeout` or `until` bound it (`on_timeout`: compensate, the default, or pause).
    """

    def __post_init__(self) -> None:
        if self.event is None:
            object.__setattr__(self, "event", self.name)
        if self.validate is not None:
            raise DefinitionError(f"approval {self.name!r}: its payload is the decision")
        object.__setattr__(self, "approval", True)
        super().__post_init__()
        if self.on_timeout == "continue":
            raise DefinitionError(
                f"approval {self.name!r}: on_timeout must be compensate or pause (an approval "
                "that times out never lets the saga go on)"
            )


# Seconds the engine's own work for a group or a child stage may take (a group's settling,
# turning a child back): their tasks' time limit.
STAGE_TIME_LIMIT = 30
# The most members a group may have, unless it says otherwise (`Group.max_fan_out`).
MAX_FAN_OUT = 1000
# The longest name of a member (a map's: its item's key).
MEMBER_NAME_MAX_LENGTH = 100


@dataclass(frozen=True)
class Group:
    """A stage whose members run at the same time, each a `Step` with its own action,
    compensation and policy, or a `Child` saga; the saga goes on once every member completed.

    Give `members` (listed steps), or `items` and `step` (a map): `items(ctx)` returns the list
    to map over, computed once when the group begins and stored then; `step` runs once per item
    (`ctx.item`), named by the item's key: `key(item)` if given, else the item itself when it
    is a string or an integer, else its position in the list. More than `max_fan_out` items
    fail the group's start (the saga pauses for an operator); an empty list completes it at once.

    `concurrency` bounds how many members run at once (None: all). A map may tolerate up to
    `tolerated_failures` members failing for good: the group then completes without them.

    When a member fails for good (beyond that tolerance), no new member starts, those running
    finish or fail, then the members that completed are compensated, one at a time in reverse
    order (of the list, or of the items), then the stages before the group in reverse. With
    `concurrent_compensation`, the members' compensations run at the same time instead (each
    holding its member's row, as an action does); the stages before the group are compensated
    once every member's is done. A saga's retry after it paused in a group runs only the
    members that did not complete.

    The group's output, which later stages read in `ctx.outputs[name]`, is a dict of the
    members' outputs by name (a map's: a list in the items' order, None for a tolerated
    failure). A member's idempotency key is `<saga>:<group>:<member>`.

    A `Child` member starts its saga when it is sent (its `input(ctx)` gets the member's
    `ctx.item`), and holds no worker while the child runs: the child completed, the member
    completed with the child's outputs; the child compensated, the member failed for good with
    the child's error. When the group compensates, a completed child is compensated, and one
    in flight aborted at once and compensated, as a child stage's.
    """

    name: str
    members: Sequence[Step | Child] = ()
    items: str | Callable[..., Any] | None = None
    step: Step | Child | None = None
    key: str | Callable[..., Any] | None = None
    max_fan_out: int = MAX_FAN_OUT
    concurrency: int | None = None
    tolerated_failures: int = 0
    concurrent_compensation: bool = False

    def __post_init__(self) -> None:
        mapped = self.items is not None or self.step is not None
        if mapped and self.members:
            raise DefinitionError(f"group {self.name!r}: give members, or items and a step")
        if mapped and (self.items is None or self.step is None):
            raise DefinitionError(f"group {self.name!r}: a map needs items and a step")
        if not mapped and not self.members:
            raise DefinitionError(f"group {self.name!r} has no members")
        if not mapped and (self.key is not None or self.tolerated_failures):
            raise DefinitionError(
                f"group {self.name!r}: key and tolerated_failures are a map's (items and step)"
            )
        steps = list(self.members) if not mapped else [self.step]
        for member in steps:
            if not isinstance(member, Step | Child):
                raise DefinitionError(f"group {self.name!r}: its members are steps or children")
            if isinstance(member, Step) and member.pivot:
                raise DefinitionError(
                    f"group {self.name!r}: a pivot inside a group is not allowed ({member.name!r})"
                )
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise DefinitionError(f"group {self.name!r} has duplicate member names")
        if any(len(n) > MEMBER_NAME_MAX_LENGTH for n in names):
            raise DefinitionError(f"group {self.name!r}: a member's name is too long")
        if not 1 <= self.max_fan_out <= 100_000:
            raise DefinitionError(f"group {self.name!r}: max_fan_out must be within [1, 100000]")
        if self.concurrency is not None and self.concurrency < 1:
            raise DefinitionError(f"group {self.name!r}: concurrency must be at least 1")
        if self.tolerated_failures < 0:
            raise DefinitionError(f"group {self.name!r}: tolerated_failures must be >= 0")
        object.__setattr__(self, "members", tuple(self.members))
        for attribute in ("items", "key"):
            value = getattr(self, attribute)
            if value is not None:
                path = dotted_path(value)
                if "<" in path:
                    raise DefinitionError(
                        f"group {self.name!r}: {attribute} must be a module-level function"
                    )
                object.__setattr__(self, attribute, path)

    def snapshot(self, on_unexpected_error: str | None = None) -> dict[str, Any]:
        """What a saga copies into the group's row when it starts: its members' definitions
        (a map's one step's) with it; a member's row holds only its state."""
        snapshot: dict[str, Any] = {
            "kind": "group",
            "members": [{**m.snapshot(on_unexpected_error), "name": m.name} for m in self.members],
            "concurrency": self.concurrency,
            "concurrent_compensation": self.concurrent_compensation,
            # What the engine reads of every stage: the members run and undo, not the group.
            # Its time limit bounds its compensation's settling (`compensation.settle`).
            "compensation": None,
            "time_limit": STAGE_TIME_LIMIT,
            "pivot": False,
        }
        if self.step is not None:
            snapshot["map"] = {
                "items": self.items,
                "key": self.key,
                "step": {**self.step.snapshot(on_unexpected_error), "name": self.step.name},
                "max_fan_out": self.max_fan_out,
                "tolerated_failures": self.tolerated_failures,
            }
        return snapshot


# How deep children may nest: a saga's child's child's ... (the saga itself is depth 0).
MAX_CHILD_DEPTH = 5


@dataclass(frozen=True)
class Child:
    """A stage that starts another registered saga, its child, and waits for it holding no
    worker (as a wait does).

    `saga` names the child's definition; `input(ctx)`, optional, computes the child's input
    from the parent's context (its input and the outputs so far; default: the parent's
    input), in the transaction that starts the child with the stage. The child completed: the
    stage completes, its output the child's outputs (a dict by the child's stage names). The
    child compensated: the stage fails with the child's error, and the parent follows its
    policy (compensates, or pauses past its pivot). A child that pauses for an operator keeps
    its parent waiting until an operator settles it.

    When the parent compensates, a completed child is compensated too (its completed steps
    undone in reverse, on its own timeline): the only way a completed saga changes. An abort
    of the parent, or its deadline, compensates a child in flight. Children nest at most
    `MAX_CHILD_DEPTH` deep, and a definition that is (transitively) its own child is refused.
    """

    name: str
    saga: str
    input: str | Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if not self.saga:
            raise DefinitionError(f"child {self.name!r}: name the child's saga")
        if self.input is not None:
            path = dotted_path(self.input)
            if "<" in path:
                raise DefinitionError(f"child {self.name!r}: input must be a module-level function")
            object.__setattr__(self, "input", path)

    def snapshot(self, on_unexpected_error: str | None = None) -> dict[str, Any]:
        """What a saga copies into the child stage's row when it starts."""
        return {
            "kind": "child",
            "saga": self.saga,
            "input": self.input,
            # What the engine reads of every stage: the child undoes itself, not the stage.
            # Its time limit bounds the task that turns the child back.
            "compensation": None,
            "time_limit": STAGE_TIME_LIMIT,
            "pivot": False,
        }


def is_child(definition: dict[str, Any]) -> bool:
    """Whether a stage's stored definition is a child's."""
    return definition.get("kind") == "child"


def steps_in(stage: Step | Wait | Group | Child) -> list[Step]:
    """The steps a stage runs: itself, a group's step members (a map's one step), or none (a
    wait, a child)."""
    if isinstance(stage, Group):
        members = list(stage.members) if stage.step is None else [stage.step]
        return [m for m in members if isinstance(m, Step)]
    return [] if isinstance(stage, Wait | Child) else [stage]


def children_in(stages: Sequence[Step | Wait | Group | Child]) -> list[Child]:
    """The children that stages start: child stages, and groups' child members."""
    found: list[Child] = []
    for stage in stages:
        if isinstance(stage, Group):
            members = list(stage.members) if stage.step is None else [stage.step]
            found += [m for m in members if isinstance(m, Child)]
        elif isinstance(stage, Child):
            found.append(stage)
    return found


def is_group(definition: dict[str, Any]) -> bool:
    """Whether a stage's stored definition is a group's."""
    return definition.get("kind") == "group"


def member_definitions(definition: dict[str, Any]) -> list[dict[str, Any]]:
    """The step definitions of a group's members as stored (a map's one step)."""
    if "map" in definition:
        return [definition["map"]["step"]]
    return list(definition["members"])


def is_wait(definition: dict[str, Any]) -> bool:
    """Whether a stage's stored definition is a wait's."""
    return definition.get("kind") == "wait"


@dataclass(frozen=True)
class Repair:
    """What would repair a discrepancy: run the compensation of the saga's step `step` again
    (an operator chooses to, after a preview; the saga's status never changes). `note` says
    to the operator what it will do."""

    step: str
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.step, str) or not 0 < len(self.step) <= 100:
            raise DefinitionError("a repair names a step: 1 to 100 characters")
        if not isinstance(self.note, str):
            raise DefinitionError("a repair's note is text")

    def as_dict(self) -> dict[str, str]:
        return {"action": "compensate", "step": self.step, "note": _stored(self.note)}


def _stored(text: str, limit: int = 500) -> str:
    """Text as a discrepancy stores it: at most `limit` characters, none PostgreSQL refuses."""
    return text.replace("\x00", "")[:limit]


@dataclass(frozen=True)
class Discrepancy:
    """A way in which the outside world disagrees with a final saga's outcome (a charge
    still held for a compensated order): `code` (an identifier), `message` (for an operator:
    no secret, no traceback) and, where there is one, the `repair` that would set it right."""

    code: str
    message: str
    repair: Repair | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.code, str) or not 0 < len(self.code) <= 100:
            raise DefinitionError("a discrepancy's code must have 1 to 100 characters")
        if not isinstance(self.message, str):
            raise DefinitionError("a discrepancy's message is text")
        if self.repair is not None and not isinstance(self.repair, Repair):
            raise DefinitionError("a discrepancy's repair is a Repair")

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"code": _stored(self.code), "message": _stored(self.message)}
        if self.repair is not None:
            found["repair"] = self.repair.as_dict()
        return found


@dataclass(frozen=True)
class ReconcileContext:
    """What a definition's `reconcile` check receives: a final saga, as its rows hold it."""

    saga_id: UUID
    name: str
    status: str  # "completed" or "compensated"
    input: dict[str, Any]
    # Each stage's output by name (a step compensated since keeps the output it had).
    outputs: dict[str, Any]
    # Each stage's status by name ("completed", "compensated", "failed", ...).
    statuses: dict[str, str]
    error_code: str

    def idempotency_key(self, step: str) -> str:
        """The idempotency key the saga's step `step` passed to external systems
        (`StepContext.idempotency_key`): to find what that step did there."""
        return f"{self.saga_id}:{step}"


@dataclass(frozen=True)
class SagaDefinition:
    """A named, ordered list of steps.

    `on_complete(ctx)` runs in the same transaction as the last step's completion.
    `deadline` (seconds) bounds how long a saga may run before it is compensated.
    `continue_compensation_on_failure` decides whether the remaining compensations still run
    after one exhausts its retries (the saga ends `failed` either way).

    `key` names the business object a saga is about (an order id), stored indexed on the saga
    so that the admin and the API find the sagas of an object: a path in the input
    (`"order_id"`, `"customer.id"`) or a function of the input (`lambda input: ...`; it may
    return None for no key). It is computed once, when the saga starts.
    `one_in_flight_per_key` allows at most one saga of this definition per key that is not
    finished (pending, running, compensating, or failed for an operator): starting another
    raises `SagaKeyInFlight`.

    `on_unexpected_error` is the default of its steps' (`Step.on_unexpected_error`).

    `reconcile(ctx)`, optional, checks a final saga against the outside world: it receives a
    `ReconcileContext` and returns the `Discrepancy`s it finds (none: the world agrees). The
    sweeper runs it on the sagas that finished within `SAGAS_RECONCILE_WINDOW`
    (`sagas.engine.reconcile`); a module-level function, as its path is stored.
    """

    name: str
    steps: Sequence[Step | Wait | Group | Child]
    on_complete: str | Callable[..., Any] | None = None
    continue_compensation_on_failure: bool = False
    # Seconds a saga may run; past it the sweeper compensates it, unless it passed its pivot.
    deadline: float | None = None
    key: str | Callable[[dict[str, Any]], Any] | None = None
    one_in_flight_per_key: bool = False
    on_unexpected_error: OnUnexpectedError | None = None
    reconcile: str | Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.reconcile is not None:
            path = dotted_path(self.reconcile)
            if "<" in path:
                raise DefinitionError(
                    f"saga {self.name!r}: reconcile must be a module-level function"
                )
            object.__setattr__(self, "reconcile", path)
        if self.on_unexpected_error not in (None, *UNEXPECTED_ERROR_POLICIES):
            raise DefinitionError(
                f"saga {self.name!r}: on_unexpected_error must be pause, compensate or retry"
            )
        if not self.steps:
            raise DefinitionError(f"saga {self.name!r} has no steps")
        names = [step.name for step in self.steps]
        if len(set(names)) != len(names):
            raise DefinitionError(f"saga {self.name!r} has duplicate step names")
        events = [s.event for s in self.steps if isinstance(s, Wait) and s.event]
        if len(set(events)) != len(events):
            raise DefinitionError(f"saga {self.name!r} waits twice for the same event")
        if isinstance(self.steps[-1], Wait):
            raise DefinitionError(f"saga {self.name!r} ends with a wait: its last stage is a step")
        if isinstance(self.steps[-1], Group | Child):
            what = "a group" if isinstance(self.steps[-1], Group) else "a child"
            raise DefinitionError(f"saga {self.name!r} ends with {what}: its last stage is a step")
        if any(child.saga == self.name for child in children_in(self.steps)):
            raise DefinitionError(f"saga {self.name!r} is its own child")
        object.__setattr__(self, "steps", tuple(self.steps))
        if self.on_complete is not None:
            object.__setattr__(self, "on_complete", dotted_path(self.on_complete))
        if self.deadline is not None and self.deadline <= 0:
            raise DefinitionError(f"saga {self.name!r}: deadline must be positive")
        if isinstance(self.key, str) and not all(self.key.split(".")):
            raise DefinitionError(f"saga {self.name!r}: key {self.key!r} is not a path")
        if self.key is not None and not isinstance(self.key, str) and not callable(self.key):
            raise DefinitionError(f"saga {self.name!r}: key must be a path or a function")
        if self.one_in_flight_per_key and self.key is None:
            raise DefinitionError(f"saga {self.name!r}: one_in_flight_per_key needs a key")

    @property
    def begins_with_a_wait(self) -> bool:
        """Whether its first stage is a wait or a group (begun once the start commits)."""
        return isinstance(self.steps[0], Wait | Group | Child)

    def key_of(self, input: dict[str, Any]) -> str | None:
        """The business key of a saga started with this input, as stored on its row."""
        if self.key is None:
            return None
        if callable(self.key):
            value = self.key(input)
        else:
            value = input
            for part in self.key.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise SagaKeyError(
                        f"saga {self.name!r}: the input has no {self.key!r}, the saga's key"
                    )
                value = value[part]
        if value is None and callable(self.key):
            return None
        if not isinstance(value, str | int | UUID) or isinstance(value, bool):
            raise SagaKeyError(
                f"saga {self.name!r}: its key must be a string, an integer or a UUID, "
                f"not {type(value).__name__}"
            )
        key = str(value)
        if not key or len(key) > KEY_MAX_LENGTH:
            raise SagaKeyError(
                f"saga {self.name!r}: its key must have 1 to {KEY_MAX_LENGTH} characters"
            )
        return key

    def snapshot(self) -> tuple[list[dict[str, Any]], str]:
        """What a saga copies into its step rows when it starts, and the digest naming it.

        Made once per definition, which does not change once made (registering a changed
        one replaces it): every start shares it, and must not change it.
        """
        return self._snapshot

    @cached_property
    def _snapshot(self) -> tuple[list[dict[str, Any]], str]:
        steps = [step.snapshot(self.on_unexpected_error) for step in self.steps]
        return steps, snapshot_version(steps)

    def validate(self) -> None:
        """Import every callable now, so a typo fails at start-up rather than mid-saga (the
        system check `sagas.E001` does this for every registered definition)."""
        for path in self.paths():
            try:
                import_callable(path)
            except CodeMissing as exc:
                raise DefinitionError(f"saga {self.name!r}: {exc}") from exc
        self.check_children()

    def check_children(self, path: tuple[str, ...] = ()) -> None:
        """Every child's definition is registered, none is its own ancestor, and they nest at
        most `MAX_CHILD_DEPTH` deep (the system check `sagas.E005` asks this of every
        registered definition)."""
        path = (*path, self.name)
        for stage in children_in(self.steps):
            if stage.saga in path:
                cycle = " -> ".join((*path, stage.saga))
                raise DefinitionError(f"saga {self.name!r}: its children form a cycle ({cycle})")
            if len(path) > MAX_CHILD_DEPTH:
                raise DefinitionError(
                    f"saga {path[0]!r}: its children nest more than {MAX_CHILD_DEPTH} deep"
                )
            child = _registry.get(stage.saga)
            if child is None:
                raise DefinitionError(
                    f"saga {self.name!r}: its child {stage.name!r} names {stage.saga!r}, "
                    "which is not registered"
                )
            child.check_children(path)

    def paths(self) -> list[str]:
        """The import paths a saga of this definition stores: callables and exception classes."""
        steps, _ = self.snapshot()
        paths = stored_paths(steps, self.on_complete)
        return sorted(paths | ({str(self.reconcile)} if self.reconcile else set()))


def stored_paths(steps: Sequence[dict[str, Any]], on_complete: Any = None) -> set[str]:
    """The import paths in step definitions as stored in step rows, and an `on_complete`."""
    paths: set[str] = set()
    for step in steps:
        if is_wait(step):
            paths.update(step[k] for k in ("validate", "until", "condition") if step.get(k))
            continue
        if is_child(step):
            paths.update([step["input"]] if step.get("input") else [])
            continue
        if is_group(step):
            mapped = step.get("map") or {}
            paths.update(mapped[k] for k in ("items", "key") if mapped.get(k))
            paths.update(stored_paths(member_definitions(step)))
            continue
        paths.add(step["action"])
        if step.get("compensation"):
            paths.add(step["compensation"])
        for policy in ("retry", "compensation_retry"):
            paths.update(step.get(policy, {}).get("transient", ()))
    if on_complete:
        paths.add(str(on_complete))
    return paths


def renamed(path: str) -> str:
    """The path a callable stored as `path` has now: `SAGAS_RENAMED_CALLABLES` followed from
    old to new (several renames in a row too), or `path` itself."""
    from . import conf

    mapping = conf.renamed_callables()
    seen = {path}
    while path in mapping:
        path = mapping[path]
        if path in seen:
            raise DefinitionError(f"SAGAS_RENAMED_CALLABLES maps {path!r} back to itself")
        seen.add(path)
    return path


def import_callable(path: str) -> Any:
    """The callable (or class) stored as `path`, under its new path if it was renamed; raises
    `CodeMissing`, naming the path, when it does not import."""
    try:
        target = renamed(path)
    except (DefinitionError, ImproperlyConfigured) as exc:  # a mapping that loops, or no dict
        raise CodeMissing(path) from exc
    try:
        return import_string(target)
    except Exception as exc:  # not there, or its module fails as it loads (a broken deploy)
        raise CodeMissing(path, target) from exc


def snapshot_version(steps: list[dict[str, Any]]) -> str:
    """The digest of step definitions as copied into step rows (`Saga.definition_version`).

    Workers read and parse the definitions of a version once: whoever changes a saga's step
    rows (a test shortening its waits, say) gives it the version of what it wrote.
    """
    encoded = json.dumps(steps, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:32]


def register(definition: SagaDefinition) -> SagaDefinition:
    """Make a definition startable by name. Registering the same name again replaces it."""
    _registry[definition.name] = definition
    return definition


def get_definition(name: str) -> SagaDefinition:
    try:
        return _registry[name]
    except KeyError:
        raise DefinitionError(f"no saga definition named {name!r}") from None


def registered() -> dict[str, SagaDefinition]:
    return dict(_registry)
