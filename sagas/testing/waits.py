"""Waits in tests: send a signal, decide an approval, end a wait as its timeout would, and what
the failure matrix does at each wait of a case.

`send_signal`, `decide` and `expire_wait` are for a project's own tests. `Player` is the
matrix's: it watches a case's saga and, each time it waits, sends the wait's event, approves or
rejects an approval, lets its time pass, or aborts the saga, as the case's scenario says
(`Scenario`), and records what came of it (`Played`), which `sagas.testing.guarantees` checks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from uuid import UUID

from celery import current_app
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.utils import timezone

from sagas.definitions import is_wait
from sagas.engine.unit import lock
from sagas.engine.waits import NotWaiting, SignalOutcome, timed_out
from sagas.exceptions import SagaBusy
from sagas.models import Saga, SagaStatus, SagaStep, StepStatus
from sagas.services import saga_approve, saga_compensate, saga_reject, saga_signal

from .worker import wait_for

if TYPE_CHECKING:
    from .matrix import Case

# What the matrix does at the wait a case is about (`Scenario.kind`).
EARLY = "early"  # the event is sent as the saga starts, before it reaches the wait
ON_TIME = "on time"  # sent once the saga waits
TWICE = "twice"  # sent twice with one idempotency key
INVALID = "invalid"  # payloads the wait refuses, then a valid one
NEVER = "never"  # never sent: the wait's timeout ends it (a timer's only case)
LATE = "late"  # sent after the timeout ended the wait
RACE = "race"  # sent as the timeout fires, at the same moment
ABORT = "abort"  # an operator aborts the saga while it waits, then the event comes
FAILS = "fails"  # the event fails the wait (`fail`): a business failure of the wait
# ... at an approval (NEVER, RACE and ABORT too, with a decision for the event):
APPROVED = "approved"  # approved once the saga waits
REJECTED = "rejected"  # rejected once the saga waits
APPROVED_TWICE = "approved twice"  # the same decision again: the first one's outcome
OVERRULED = "overruled"  # approved, then rejected: the second refused
DECIDED_EARLY = "decided early"  # approved and rejected before the saga waits (NotWaiting)

# A decision refused as the saga did not wait at the approval yet (`Sent.status`).
NOT_WAITING = "NotWaiting"
# Who the kit is when it acts as an operator or an approver (the timeline names it).
ACTOR = "test-kit"
# The failure a signal of the FAILS case carries.
FAILURE = {"code": "kit_failed", "message": "The test kit failed the wait."}
FINAL = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)


# -- for a project's own tests ---------------------------------------------------------------


def send_signal(
    saga: Saga | UUID | str,
    event: str,
    payload: Any = None,
    *,
    idempotency_key: str | None = None,
    fail: dict[str, str] | None = None,
    when_waiting: bool = False,
    timeout: float = 30.0,
) -> SignalOutcome:
    """Send `event` to the saga, as your code would (`sagas.services.saga_signal`), and return
    its outcome (`status`: "consumed", "kept" or "refused"; `repeated`).

    With `when_waiting`, first wait (at most `timeout` seconds) until the saga waits for this
    event, so that its wait consumes the signal rather than keeps it for later; an
    AssertionError if the saga ends, or stops at another wait, first. Call it outside a
    transaction, as the worker must see what the signal changes (what comes after the wait
    is sent to the worker as the signal commits)."""
    saga_id = _id(saga)
    if when_waiting:
        wait_until_waiting(saga_id, event=event, timeout=timeout)
    return saga_signal(
        saga_id=saga_id, event=event, payload=payload, idempotency_key=idempotency_key, fail=fail
    )


def decide(
    saga: Saga | UUID | str,
    *,
    approve: bool,
    stage: str | None = None,
    actor: str = ACTOR,
    note: str = "",
    when_waiting: bool = False,
    timeout: float = 30.0,
) -> SignalOutcome:
    """Approve (`approve=True`) or reject the saga's approval as a person would
    (`sagas.services.saga_approve`, `saga_reject`), as `actor`, with `note`, and return the
    outcome (`status`: "consumed", "kept" while a step holds the saga, or "refused";
    `repeated`). `stage`: the approval's name, for a saga with several; by default the one it
    waits at.

    With `when_waiting`, first wait (at most `timeout` seconds) until the saga waits at the
    approval: a decision before that is a `NotWaiting` error, and stores nothing. An
    AssertionError if the saga ends, or stops at another wait, first. Call it outside a
    transaction, as `send_signal`."""
    saga_id = _id(saga)
    if when_waiting:
        wait_until_waiting(saga_id, name=stage, approval=True, timeout=timeout)
    decision = saga_approve if approve else saga_reject
    return decision(saga_id=saga_id, actor=actor, note=note, stage=stage)


def expire_wait(saga: Saga | UUID | str, wait: str | None = None, *, timeout: float = 30.0) -> bool:
    """End the saga's wait now as its timeout would, without waiting for it: its due time
    becomes now, and the wait ends as the sweeper ends a due wait, under the saga's lock, as
    its `on_timeout` says (compensate, pause, or continue; a timer goes on).

    `wait`: the wait's name; without it, the first one the saga waits at. First waits (at
    most `timeout` seconds) until the saga waits there; an AssertionError if it ends, or
    stops at another wait, first, or if the wait has no timeout. Returns True if the timeout
    ended the wait, False if something else (its signal, an operator) ended it first."""
    saga_id = _id(saga)
    index = wait_until_waiting(saga_id, name=wait, timeout=timeout)
    return time_out(saga_id, index, now=True, timeout=timeout)


def wait_until_waiting(
    saga_id: UUID | str,
    *,
    name: str | None = None,
    event: str | None = None,
    approval: bool = False,
    timeout: float = 30.0,
) -> int:
    """Wait until the saga waits at a wait (the one of that name, or for that event, or an
    approval), and return its stage's index."""
    what = f"saga {saga_id} to wait" + (f" at {name}" if name else "")
    what += f" for {event}" if event else ""
    what += " at an approval" if approval and not name else ""

    def waiting() -> tuple[int] | None:
        saga = Saga.objects.values("status", "current_step").get(pk=saga_id)
        if saga["status"] in FINAL:
            raise AssertionError(f"{what}: it ended {saga['status']} first")
        if saga["status"] != SagaStatus.WAITING:
            return None
        row = SagaStep.objects.get(saga_id=saga_id, index=saga["current_step"])
        if row.status != StepStatus.WAITING:
            return None
        if (name and row.name != name) or (event and row.definition.get("event") != event):
            raise AssertionError(f"{what}: it waits at {row.name} instead")
        if approval and not row.definition.get("approval"):
            raise AssertionError(f"{what}: it waits at {row.name} instead, not an approval")
        return (row.index,)  # (a stage's index may be 0)

    found = wait_for(waiting, timeout=timeout, what=what)
    assert found is not None
    return found[0]


def make_due(saga_id: UUID | str, index: int) -> bool:
    """Move the due time of the waiting wait `index` to now, under the saga's lock. False if
    the wait no longer waits; an AssertionError if it has no timeout."""
    with transaction.atomic():
        unit = lock(saga_id)
        step = unit.steps[index]
        if unit.saga.status != SagaStatus.WAITING or step.status != StepStatus.WAITING:
            return False
        if step.due_at is None:
            raise AssertionError(f"the wait {step.name} has no timeout: it cannot expire")
        now = timezone.now()
        if step.due_at > now:
            unit.move_step(step, StepStatus.WAITING, None, due_at=now)
            unit.save()
        return True


def time_out(saga_id: UUID | str, index: int, *, now: bool = False, timeout: float = 30.0) -> bool:
    """End the wait `index` as the sweeper ends a due wait (`sagas.engine.waits.timed_out`,
    under the saga's lock; a saga that something else holds is tried again, as at the next
    sweep), its due time first moved to now if `now`. True if the timeout ended it."""

    def attempt() -> bool | None:
        with transaction.atomic():
            try:
                unit = lock(saga_id, wait=0.2)
            except SagaBusy:  # a signal, a step after it: ended, or try again
                return None if _waiting(saga_id, index) else False
            step = unit.steps[index]
            if unit.saga.status != SagaStatus.WAITING or step.status != StepStatus.WAITING:
                return False
            if step.due_at is None:
                raise AssertionError(f"the wait {step.name} has no timeout: it cannot expire")
            if now and step.due_at > timezone.now():
                unit.move_step(step, StepStatus.WAITING, None, due_at=timezone.now())
            ended = timed_out(unit, index)
            if ended:
                unit.save()
            return ended

    def done() -> list[bool] | None:
        ended = attempt()
        return None if ended is None else [ended]

    ended = wait_for(done, timeout=timeout, what=f"the lock of saga {saga_id}")
    assert ended is not None
    return ended[0]


def _id(saga: Saga | UUID | str) -> UUID | str:
    return saga.pk if isinstance(saga, Saga) else saga


# -- what the matrix does at a case's waits --------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """What a case does at one wait of its saga: `kind` (EARLY, ON_TIME, ...), at the wait
    named `wait` (stage `index`), whose event is `event` (None for a timer); `approval` if
    the wait is an approval (its "signals" are decisions)."""

    kind: str
    wait: str
    index: int
    event: str | None
    approval: bool = False


@dataclass
class Sent:
    """A signal the kit sent (or a decision it took on an approval: its payload is the
    decision), and what became of it: the outcome's `status`, "invalid" when it was refused as
    invalid (a ValidationError: nothing stored), or "NotWaiting" for a decision refused as
    the saga did not wait at the approval yet (nothing stored)."""

    event: str
    payload: Any
    key: str | None
    status: str
    signal_id: int | None = None
    repeated: bool = False
    reason: str = ""
    why: str = ""  # what the kit sent it for: the scenario's step ("late", "again", ...)


@dataclass
class Played:
    """What the kit did at the waits of a case's saga, and what it saw."""

    sent: list[Sent] = field(default_factory=list)
    timed_out: dict[str, bool] = field(default_factory=dict)  # wait -> the timeout ended it
    aborted: bool = False
    still_waiting: bool | None = None  # after the invalid payloads: the wait still waited
    reached: set[str] = field(default_factory=set)  # the waits the saga waited at
    problems: list[str] = field(default_factory=list)

    def of(self, why: str) -> list[Sent]:
        return [sent for sent in self.sent if sent.why == why]


class Player:
    """Plays a case at its saga's waits: each time the saga waits, once per wait, the case's
    scenario if the wait is the case's, else the event's valid payload (a timer: its time
    passes); at a wait only once `may_act(index)` says so. Stops (`stopped`) when it cannot go
    on, with a problem saying why."""

    def __init__(self, case: Case, saga: Saga, *, may_act: Callable[[int], bool]) -> None:
        self.case, self.saga, self.played = case, saga, Played()
        self.scenario, self.may_act = case.scenario, may_act
        self.acted: set[int] = set()
        self.stopped = False

    # (The start's transaction: the saga has not run anything yet.)
    def at_start(self) -> None:
        scenario = self.scenario
        if scenario is not None and scenario.kind == EARLY and scenario.event:
            self._send(scenario.event, "early")
        if scenario is not None and scenario.kind == DECIDED_EARLY:
            self._decide(scenario.wait, approve=True, why="early")
            self._decide(scenario.wait, approve=False, why="early")

    def act(self) -> None:
        """Act if the saga waits at a wait not acted on yet."""
        if self.stopped:
            return
        saga = Saga.objects.values("status", "current_step").get(pk=self.saga.pk)
        if saga["status"] != SagaStatus.WAITING:
            return
        row = SagaStep.objects.get(saga_id=self.saga.pk, index=saga["current_step"])
        if row.status != StepStatus.WAITING or row.index in self.acted:
            return
        if not is_wait(row.definition):
            return  # a child stage: its child saga runs on its own
        if not self.may_act(row.index):
            return
        self.acted.add(row.index)
        self.played.reached.add(row.name)
        try:
            self._at_wait(row)
        except Exception as exc:  # a problem of the case, said as one (and the case stops)
            self.stop(f"at {row.name}, the kit got {type(exc).__name__}: {exc}")

    def stop(self, problem: str) -> None:
        self.played.problems.append(problem)
        self.stopped = True

    def _at_wait(self, row: SagaStep) -> None:
        scenario = self.scenario
        event = row.definition.get("event")
        if scenario is None or scenario.index != row.index:
            self._answer(row, "on time")
            return
        kind = scenario.kind
        if scenario.approval:
            self._at_approval(row, kind)
            return
        if kind == EARLY:
            self.played.problems.append(
                f"the saga waited at {row.name} though its event came before the wait began "
                "(and was kept)"
            )
            self._send(event, "on time")  # so that the case ends
        elif kind == ON_TIME:
            self._send(event, "on time")
        elif kind == TWICE:
            key = self._key(event, "twice")
            self._send(event, "first", key=key)
            self._send(event, "again", key=key)
        elif kind == INVALID:
            for payload in self.case.matrix.invalid_payloads_for(row.definition, self.saga):
                self._send(event, "invalid", payload=payload)
            self.played.still_waiting = _waiting(self.saga.pk, row.index)
            self._send(event, "on time")
        elif kind == NEVER:
            self._expire(row, now=True)
        elif kind == LATE:
            self._expire(row, now=True)
            self._send(event, "late")
        elif kind == FAILS:
            self._send(event, "failing", fail=FAILURE)
        elif kind == RACE:
            self._race(row)
        elif kind == ABORT:
            self._abort(row)

    def _at_approval(self, row: SagaStep, kind: str) -> None:
        """A case about an approval: decided as a person would (never by a plain signal)."""
        if kind == APPROVED:
            self._decide(row.name, approve=True, why="approved")
        elif kind == REJECTED:
            self._decide(row.name, approve=False, why="rejected")
        elif kind == APPROVED_TWICE:
            self._decide(row.name, approve=True, why="first")
            self._decide(row.name, approve=True, why="again")
        elif kind == OVERRULED:
            self._decide(row.name, approve=True, why="approved")
            self._decide(row.name, approve=False, why="then rejected")
        elif kind == DECIDED_EARLY:
            self._answer(row, "on time")
        elif kind == NEVER:
            self._expire(row, now=True)
        elif kind == RACE:
            self._race(row)
        elif kind == ABORT:
            self._abort(row)

    def _answer(self, row: SagaStep, why: str) -> None:
        """What the outside world does when all goes well: the wait's event with its valid
        payload, an approval approved, a timer's time passing."""
        definition = row.definition
        if definition.get("approval"):
            self._decide(row.name, approve=True, why=why)
        elif definition.get("event"):
            self._send(definition["event"], why)
        else:
            self._expire(row, now=True)

    def _abort(self, row: SagaStep) -> None:
        """An operator's abort while the saga waits, then the wait's answer, which comes late."""
        saga_compensate(saga_id=self.saga.pk, actor=ACTOR)
        self.played.aborted = True
        self._answer(row, "after the abort")

    def _race(self, row: SagaStep) -> None:
        """The event and the timeout at the same moment, each in a thread of its own with its
        own connection: the wait is due, then both go at once."""
        if not make_due(self.saga.pk, row.index):
            self.stop(f"{row.name} no longer waited before the race")
            return
        start = threading.Barrier(2)
        failures: list[BaseException] = []
        # Celery's current app is the thread's: a new thread's would be a default one, which
        # would send what comes after the wait nowhere.
        app: Any = current_app._get_current_object()  # type: ignore[attr-defined]

        def run(action: Callable[[], None]) -> None:
            app.set_current()
            try:
                start.wait(timeout=10)
                action()
            except BaseException as exc:  # said below, in the test's thread
                failures.append(exc)
            finally:
                connection.close()

        threads = [
            threading.Thread(target=run, args=(lambda: self._answer(row, "racing"),)),
            threading.Thread(target=run, args=(lambda: self._expire(row, now=False),)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failures:
            raise failures[0]

    def _send(
        self,
        event: str,
        why: str,
        *,
        payload: Any = None,
        key: str | None = None,
        fail: dict[str, str] | None = None,
    ) -> Sent:
        if why != "invalid" and fail is None:  # a signal that fails the wait carries nothing
            payload = self.case.matrix.payload_for(event, self.saga)
        key = key or self._key(event, why)
        try:
            outcome = saga_signal(
                saga_id=self.saga.pk, event=event, payload=payload, idempotency_key=key, fail=fail
            )
        except ValidationError as error:
            sent = Sent(event, payload, key, "invalid", reason="; ".join(error.messages), why=why)
        else:
            sent = _sent(event, payload, key, outcome, why)
        self.played.sent.append(sent)
        return sent

    def _decide(self, stage: str, *, approve: bool, why: str) -> Sent:
        """Approve or reject the approval `stage` as a person would, as `ACTOR`; recorded as a
        `Sent` of the approval's event whose payload is the decision."""
        event = getattr(self.case.matrix.stage(stage), "event", None) or stage
        note = f"{why}, by the test kit"
        payload = {"decision": "approved" if approve else "rejected", "by": ACTOR, "note": note}
        decision = saga_approve if approve else saga_reject
        try:
            outcome = decision(saga_id=self.saga.pk, actor=ACTOR, note=note, stage=stage)
        except NotWaiting as error:
            sent = Sent(event, payload, None, NOT_WAITING, reason=str(error), why=why)
        else:
            sent = _sent(event, payload, None, outcome, why)
        self.played.sent.append(sent)
        return sent

    def _expire(self, row: SagaStep, *, now: bool) -> None:
        self.played.timed_out[row.name] = time_out(
            self.saga.pk, row.index, now=now, timeout=self.case.matrix.timeout
        )

    def _key(self, event: str, why: str) -> str | None:
        return None if why == "invalid" else f"{ACTOR}:{event}:{why.replace(' ', '-')}"


def _sent(event: str, payload: Any, key: str | None, outcome: SignalOutcome, why: str) -> Sent:
    return Sent(
        event,
        payload,
        key,
        outcome.status,
        outcome.signal_id,
        outcome.repeated,
        outcome.reason,
        why=why,
    )


def _waiting(saga_id: UUID | str, index: int) -> bool:
    return SagaStep.objects.filter(
        saga_id=saga_id, index=index, status=StepStatus.WAITING, saga__status=SagaStatus.WAITING
    ).exists()
