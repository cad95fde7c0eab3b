"""The failure matrix of a saga definition: its cases, how each is planted, what it must end in.

A case plants `Fault` rows on one saga as it starts (in the transaction that creates it, so the
worker sees them from its first message), lets a real worker run the saga to its end, and
returns a `Result` whose `assert_guarantees()` checks the framework's promises and the user's
invariant. What a case expects follows from the definition alone: its steps' order, their
compensations, retry policies, `on_exhausted`, `pivot` and `compensate_failed_step`, and its
waits' events and `on_timeout`.

At each wait the kit acts when the saga waits there (`sagas.testing.waits.Player`): a case about
that wait plays its scenario (the event early, on time, twice, invalid, failing the wait, never,
late, racing the timeout, or an abort; an approval approved, rejected, approved twice, approved
then rejected, decided before the saga waits, never decided, decided as the timeout fires, or an
abort); any other case sends the event's valid payload, approves the approval, or lets a
timer's time pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import pairwise
from typing import TYPE_CHECKING, Any

from celery import current_app
from django.apps import apps
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction

from sagas.definitions import (
    Child,
    Group,
    SagaDefinition,
    Step,
    Wait,
    get_definition,
    register,
    registered,
    snapshot_version,
)
from sagas.models import Saga, SagaStatus, SagaStep, StepStatus
from sagas.services import saga_start

from . import waits
from .models import Fault, FaultEffect, FaultPoint
from .waits import Player, Scenario
from .worker import wait_for, wait_idle

if TYPE_CHECKING:
    from .guarantees import Result
    from .worker import CeleryWorker

BUSINESS, TRANSIENT = "injected_business_error", "injected_transient_error"
FINAL = (SagaStatus.COMPLETED, SagaStatus.COMPENSATED, SagaStatus.FAILED)

Invariant = Callable[[Saga], object]
Start = Callable[[dict[str, Any]], Any]
# A signal's payload: the value itself, or a function of the case's saga that returns it.
Payload = Any


@dataclass(frozen=True)
class PlannedFault:
    """A fault a case plants on its saga: where (step and point) and what."""

    step: str
    point: str
    effect: str


@dataclass(frozen=True)
class Expected:
    """Where a case must end: the saga's status and error code, every step's status, the
    compensations in the order they must run, and the attempts the policy allows."""

    status: str
    error_code: str
    steps: dict[str, str]
    compensated: tuple[str, ...] = ()
    attempts: dict[str, int] = field(default_factory=dict)
    compensation_attempts: dict[str, int] = field(default_factory=dict)
    business_failure: str | None = None  # the step whose business error must not be retried
    duplicates: tuple[tuple[str, str], ...] = ()  # (step, "action" or "compensation") redelivered
    # A group's members: the statuses each may end in, by `<group>.<member>`, `<group>[<i>]`
    # or `<group>.*` (every member not named otherwise).
    members: dict[str, frozenset[str]] = field(default_factory=dict)
    # The child saga each child stage started: its final status ("": none started).
    children: dict[str, str] = field(default_factory=dict)
    # (a member, another): the first completed after the other failed for good.
    completed_after: tuple[str, str] | None = None


@dataclass(frozen=True, eq=False)
class Case:
    """One case of the matrix. `str(case)` is its id, e.g. "charge_payment fails for good".

    `scenario`: what the case does at one of the saga's waits, if it is about a wait.
    `if_timed_out`: where a case whose event races the timeout must end if the timeout won
    (`expected` if the event did)."""

    id: str
    faults: tuple[PlannedFault, ...]
    expected: Expected
    matrix: FailureMatrix = field(repr=False)
    scenario: Scenario | None = None
    if_timed_out: Expected | None = None

    def __str__(self) -> str:
        return self.id

    def run(self, worker: CeleryWorker | None = None, *, timeout: float | None = None) -> Result:
        """Start a saga with this case's faults, wait for its end on the real worker, and
        return what happened. Call it outside any transaction (the worker must see the saga).

        With `worker`, the saga's messages go to that worker's queue, and the kit knows which
        nodes to ask whether they still hold any of them.
        """
        from .guarantees import Result

        if connection.in_atomic_block:
            raise RuntimeError(
                "run a case outside a transaction, so that the worker sees the saga: "
                "pytest's django_db(transaction=True), or Django's TransactionTestCase"
            )
        timeout = self.matrix.timeout if timeout is None else timeout
        routed = worker.routed() if worker is not None else nullcontext()
        with routed:  # what the kit's signals and timeouts send goes to the worker's queue
            saga, player = self._start()
            unfinished = self._wait(saga, worker, timeout, player)
        return Result.read(self, saga.pk, unfinished, player.played)

    def _start(self) -> tuple[Saga, Player]:
        with transaction.atomic():  # the chain is sent as this commits
            saga = self.matrix.start_saga()
            Fault.objects.bulk_create(
                Fault(saga=saga, step_name=f.step, point=f.point, effect=f.effect)
                for f in self.faults
            )
            if self.matrix.retry_wait is not None:
                shorten_retry_waits(saga, self.matrix.retry_wait)
            player = Player(self, saga, may_act=partial(self._may_answer, saga))
            player.at_start()  # an event sent early: before the saga has run anything
        return saga, player

    def _may_answer(self, saga: Saga, index: int) -> bool:
        """Whether the kit may answer the wait `index`: not before the planted duplicates of
        the steps before it came, since a message of the chain before the wait that comes
        once the saga went on from it (a new epoch) stops without a trace."""
        from .guarantees import duplicates_missing

        wanted = tuple(
            (name, kind)
            for name, kind in self.expected.duplicates
            if kind == "action" and self.matrix.position(name) < index
        )
        return not wanted or not duplicates_missing(saga.pk, wanted)

    def _wait(
        self, saga: Saga, worker: CeleryWorker | None, timeout: float, player: Player
    ) -> list[str]:
        """Wait for the end (acting at each wait), for the planted duplicates, then for the
        workers to let go of the saga; say what did not happen in time."""

        def ended() -> bool:
            player.act()
            return player.stopped or _status(saga) in FINAL

        waits: list[tuple[str, Callable[[], bool]]] = [
            ("the saga to reach a final state", ended),
            ("every planted duplicate to be delivered", lambda: _duplicates_seen(saga, self)),
        ]
        for what, condition in waits:
            try:
                wait_for(condition, timeout=timeout, what=what)
            except AssertionError:
                return [f"timed out after {timeout}s waiting for {what}"]
            if player.stopped:
                return []  # the player said why
        nodes = worker.node_names if worker is not None else None
        queue = worker.queue if worker is not None else None
        try:
            wait_idle(current_app, queue, nodes, saga.pk, timeout=timeout)
        except AssertionError:
            return [f"the workers still held messages of the saga {timeout}s after its end"]
        return []


class FailureMatrix:
    """The failure matrix of a saga definition.

        matrix = FailureMatrix(definition, make_input=..., invariant=check_books)
        for case in matrix.cases():
            case.run(worker).assert_guarantees()

    `definition`: a `SagaDefinition` or the name of a registered one. One not registered yet
    is registered in this process, which starts it by name; the worker needs only to import
    its actions and compensations, and `sagas.testing` in its INSTALLED_APPS.
    `make_input()`: a fresh input for each case (create the rows it needs there).
    `start(input)`: how the saga starts, returning the saga or `(saga, ...)`, for sagas
    started by a service of their own; by default `saga_start(name=..., input=...)`.
    `invariant(saga)`: the user's own check of the domain once the saga ended; it fails by
    raising AssertionError (or returning False).
    `timeout`: seconds a case may take. `retry_wait`: the longest wait between two attempts,
    in seconds (the waits of the saga's copy of its policy are cut to it; the number of
    attempts and what happens when they run out stay the definition's); None keeps them.

    A saga with waits: `payloads` gives, by event, the payload the kit sends when a case
    signals that event (a valid one; None for an event not given), or a function of the
    case's saga that returns it. `invalid_payloads` gives, by event, payloads its wait must
    refuse (its `validate`), each a value or such a function; the kit adds one larger than
    the wait's `max_payload_bytes`. An approval takes neither: the kit decides it
    (`sagas.services.saga_approve`, `saga_reject`) as "test-kit", and its output is the
    decision.
    """

    def __init__(
        self,
        definition: SagaDefinition | str,
        *,
        make_input: Callable[[], dict[str, Any]] = dict,
        start: Start | None = None,
        invariant: Invariant | None = None,
        timeout: float = 60.0,
        retry_wait: float | None = 0.1,
        payloads: Mapping[str, Payload] | None = None,
        invalid_payloads: Mapping[str, Sequence[Payload]] | None = None,
    ) -> None:
        if not apps.is_installed("sagas.testing"):
            raise ImproperlyConfigured(
                'add "sagas.testing" to INSTALLED_APPS in your test settings (never in '
                "production): the failure matrix plants its faults through its table and hook"
            )
        if isinstance(definition, str):
            definition = get_definition(definition)
        elif definition.name not in registered():
            register(definition)
        self.stages: tuple[Step | Wait | Group | Child, ...] = tuple(definition.steps)
        self.steps: tuple[Step, ...] = tuple(s for s in self.stages if isinstance(s, Step))
        self.waits: tuple[Wait, ...] = tuple(s for s in self.stages if isinstance(s, Wait))
        self.groups: tuple[Group, ...] = tuple(s for s in self.stages if isinstance(s, Group))
        self.children: tuple[Child, ...] = tuple(s for s in self.stages if isinstance(s, Child))
        self.definition, self.make_input, self.start = definition, make_input, start
        self.invariant, self.timeout, self.retry_wait = invariant, timeout, retry_wait
        self.payloads = dict(payloads or {})
        self.invalid_payloads = {e: list(p) for e, p in (invalid_payloads or {}).items()}
        self._check_waits()

    def _check_waits(self) -> None:
        name = self.definition.name
        approvals = {w.event for w in self.waits if is_approval(w)}
        events = {w.event for w in self.waits if w.event and not is_approval(w)}
        given = {"payloads": self.payloads, "invalid_payloads": self.invalid_payloads}
        for what, by_event in given.items():
            decided = sorted(set(by_event) & approvals)
            if decided:
                raise ImproperlyConfigured(
                    f"{what} for {decided}: an approval's payload is its decision, which the "
                    "kit takes (approve, reject); give payloads for events only"
                )
            unknown = sorted(set(by_event) - events)
            if unknown:
                raise ImproperlyConfigured(
                    f"{what} for {unknown}: no wait of saga {name!r} waits for "
                    f"{'it' if len(unknown) == 1 else 'them'} (its events: {sorted(events)})"
                )

    def cases(self) -> list[Case]:
        steps = self.steps
        trigger = self.last_compensable()
        cases = [self._fails_for_good(i) for i in range(len(steps))]
        cases += [self._retries_exhausted(i) for i in range(len(steps))]
        cases += [
            self._compensation_fails(trigger, name)
            for name in self.owed(trigger)
            if isinstance(step := self.stage(name), Step) and step.compensation
        ]
        cases += [self._delivered_twice(None), self._delivered_twice(trigger)]
        for position, stage in enumerate(self.stages):
            if isinstance(stage, Wait):
                cases += self._wait_cases(position, stage)
            elif isinstance(stage, Group):
                cases += self._group_cases(position, stage)
            elif isinstance(stage, Child):
                cases += self._child_fails(position, stage)
        return cases

    def case(self, id: str) -> Case:
        for case in self.cases():
            if case.id == id:
                return case
        raise KeyError(f"no case {id!r}; the cases are {[c.id for c in self.cases()]}")

    def parametrize(self, argname: str = "case") -> Any:
        """`@matrix.parametrize()`: a pytest test per case, named by the case's id."""
        import pytest

        return pytest.mark.parametrize(argname, self.cases(), ids=str)

    def start_saga(self) -> Saga:
        saga_input = self.make_input()
        if self.start is None:
            started: Any = saga_start(name=self.definition.name, input=saga_input)
        else:
            started = self.start(saga_input)
        saga = started[0] if isinstance(started, tuple) else started
        if not isinstance(saga, Saga):
            raise TypeError(f"start() returned {started!r}, not a saga or (saga, ...)")
        return saga

    # -- the payloads a case sends --------------------------------------------------------------

    def payload_for(self, event: str, saga: Saga) -> Any:
        """The valid payload of `event` for the case's saga (`payloads`)."""
        return _given(self.payloads.get(event), saga)

    def invalid_payloads_for(self, wait: dict[str, Any], saga: Saga) -> list[Any]:
        """The payloads the wait (its stored definition) must refuse: the user's, then one
        larger than its `max_payload_bytes` as JSON."""
        given = [_given(p, saga) for p in self.invalid_payloads.get(wait["event"], [])]
        return [*given, {"padding": "x" * int(wait["max_payload_bytes"])}]

    # -- reading the definition ----------------------------------------------------------------

    def index(self, name: str) -> int:
        return [s.name for s in self.steps].index(name)

    def position(self, name: str) -> int:
        """The stage index of a step or a wait."""
        return [s.name for s in self.stages].index(name)

    def stage(self, name: str) -> Step | Wait | Group | Child:
        return self.stages[self.position(name)]

    def steps_before(self, position: int) -> list[str]:
        """The stages before stage `position` that a failure there undoes, in reverse: steps,
        groups (the members that completed) and child stages (their children); a wait undoes
        nothing."""
        return [s.name for s in reversed(self.stages[:position]) if not isinstance(s, Wait)]

    def pivot_before(self, position: int) -> bool:
        return any(isinstance(s, Step) and s.pivot for s in self.stages[:position])

    def after_pivot(self, index: int) -> bool:
        """Whether a pivot step comes before `index`: its failure pauses the saga."""
        return any(step.pivot for step in self.steps[:index])

    def last_compensable(self) -> int:
        """The last step whose failure still compensates: the last one, or the first pivot."""
        pivots = [i for i, step in enumerate(self.steps) if step.pivot]
        return min([len(self.steps) - 1, *pivots])

    def owed(self, index: int) -> list[str]:
        """The compensations that step `index` failing for good runs, in their order (a group
        by its name, a child stage by its own)."""
        step = self.steps[index]
        failed = [step.name] if step.compensate_failed_step else []
        return failed + self.steps_before(self.position(step.name))

    # -- the cases -----------------------------------------------------------------------------

    def _fails_for_good(self, index: int) -> Case:
        step = self.steps[index]
        paused = self.after_pivot(index)
        expected = self._stopped_at(index, paused=paused, code=BUSINESS, attempts=1)
        expected = replace(expected, business_failure=step.name)
        name = f"{step.name} fails for good" + (" after the pivot" if paused else "")
        return self._case(name, [(step.name, FaultPoint.BEFORE_ACTION, BUSINESS_FAULT)], expected)

    def _retries_exhausted(self, index: int) -> Case:
        step = self.steps[index]
        after_pivot = self.after_pivot(index) and step.on_exhausted == "compensate"
        paused = step.on_exhausted == "pause" or after_pivot
        attempts = step.retry.max_attempts
        expected = self._stopped_at(index, paused=paused, code=TRANSIENT, attempts=attempts)
        how = "pause, after the pivot" if after_pivot else step.on_exhausted
        fault = (step.name, FaultPoint.BEFORE_ACTION, FaultEffect.TRANSIENT_ERROR)
        return self._case(f"{step.name} retries exhausted ({how})", [fault], expected)

    def _compensation_fails(self, trigger: int, name: str) -> Case:
        step = self.steps[self.index(name)]
        owed = self.owed(trigger)
        before, after = owed[: owed.index(name)], owed[owed.index(name) + 1 :]
        carry_on = self.definition.continue_compensation_on_failure
        statuses = self._stopped_at(trigger, paused=True, code=BUSINESS, attempts=1).steps
        statuses |= {n: StepStatus.COMPENSATED for n in before} | {
            name: StepStatus.COMPENSATION_FAILED
        }
        # A compensation that halts leaves the steps it never reached completed.
        statuses |= {n: StepStatus.COMPENSATED if carry_on else StepStatus.COMPLETED for n in after}
        expected = Expected(
            status=SagaStatus.FAILED,
            error_code="compensation_failed",
            steps=statuses,
            compensated=tuple(before + (after if carry_on else [])),
            compensation_attempts={name: step.compensation_retry.max_attempts},
        )
        faults = [
            (self.steps[trigger].name, FaultPoint.BEFORE_ACTION, BUSINESS_FAULT),
            (name, FaultPoint.BEFORE_COMPENSATION, FaultEffect.TRANSIENT_ERROR),
        ]
        function = str(step.compensation).rsplit(".", 1)[-1]
        return self._case(f"{function} fails for good (compensation of {name})", faults, expected)

    def _delivered_twice(self, trigger: int | None) -> Case:
        """Every step's message, and every compensation's, delivered again after its commit;
        with a failure, the chain's error callback sent twice too."""
        steps, groups = self.steps, {group.name for group in self.groups}
        # A group's name plants it in each of its members; a child stage's, in its compensation.
        sent = [s.name for s in self.stages if not isinstance(s, Wait)]
        faults = [(name, FaultPoint.AFTER_COMMIT, FaultEffect.REDELIVER) for name in sent]
        if trigger is None:
            # A step's message delivered again once the saga went on to a group or a child
            # (under a new epoch) stops without a trace: nothing to see of it.
            names = [
                s.name
                for s, after in zip(self.stages, [*self.stages[1:], None], strict=True)
                if isinstance(s, Group)
                or (isinstance(s, Step) and not isinstance(after, Group | Child))
            ]
            expected = replace(self._completed(), duplicates=tuple((n, "action") for n in names))
            return self._case("every message delivered twice", faults, expected)
        name = steps[trigger].name
        faults += [
            (name, FaultPoint.BEFORE_ACTION, BUSINESS_FAULT),
            (name, FaultPoint.AFTER_FINAL_FAILURE, FaultEffect.REPEAT_CALLBACK),
        ]
        expected = self._stopped_at(trigger, paused=False, code=BUSINESS, attempts=1)
        # A compensation's message delivered again once a group's compensation began (a new
        # chain, under a new epoch) stops without a trace: nothing to see of it.
        owed = expected.compensated
        # Nor is a member's of a group compensating concurrently, once the last of them sent
        # the rest (a new epoch).
        following = dict(pairwise(owed))
        seen = [
            name
            for name in owed
            if following.get(name) not in groups and name not in self.together()
        ]
        expected = replace(
            expected,
            business_failure=name,
            duplicates=tuple((n, "compensation") for n in seen),
        )
        return self._case(f"every message delivered twice, {name} fails for good", faults, expected)

    def _stopped_at(self, index: int, *, paused: bool, code: str, attempts: int) -> Expected:
        """Step `index` failed for good: the saga pauses there, or compensates what it owes."""
        name = self.steps[index].name
        owed = [] if paused else self.owed(index)
        statuses = self._statuses(self.position(name), StepStatus.FAILED)
        statuses |= dict.fromkeys(owed, StepStatus.COMPENSATED)
        return Expected(
            status=SagaStatus.FAILED if paused else SagaStatus.COMPENSATED,
            error_code=code,
            steps=statuses,
            compensated=tuple(owed),
            attempts={name: attempts},
        )

    def _statuses(self, position: int, status: str) -> dict[str, str]:
        """Every stage's status when the saga stopped at stage `position` with `status`: the
        stages before it completed (waits included), those after it pending."""
        return {
            stage.name: StepStatus.COMPLETED
            if i < position
            else status
            if i == position
            else StepStatus.PENDING
            for i, stage in enumerate(self.stages)
        }

    # -- the cases of a wait -------------------------------------------------------------------

    def _wait_cases(self, position: int, wait: Wait) -> list[Case]:
        """A timer's time passes. An event's wait: the event early, on time, twice, invalid,
        failing the wait; never, late and racing the timeout (if it has one); an abort while
        it waits. An approval: `_approval_cases`."""
        if wait.event is None:
            return [self._wait_case(waits.NEVER, position, f"{wait.name} times out")]
        if is_approval(wait):
            return self._approval_cases(position, wait)
        event = wait.event
        completed = self._completed()
        paused = self.pivot_before(position)
        cases = [
            self._wait_case(waits.EARLY, position, f"{event} sent early", completed),
            self._wait_case(waits.ON_TIME, position, f"{event} sent on time", completed),
            self._wait_case(waits.TWICE, position, f"{event} sent twice", completed),
            self._wait_case(
                waits.INVALID, position, f"{event} sent with an invalid payload", completed
            ),
            self._wait_case(
                waits.FAILS,
                position,
                f"{event} fails the wait" + (" after the pivot" if paused else ""),
                self._wait_failed(position, str(waits.FAILURE["code"]), pause=False),
            ),
        ]
        if has_timeout(wait):
            cases += [
                self._wait_case(
                    waits.NEVER, position, f"{event} never sent (timeout: {self._how(position)})"
                ),
                self._wait_case(waits.LATE, position, f"{event} sent after the timeout"),
                replace(
                    self._wait_case(
                        waits.RACE, position, f"{event} sent as the timeout fires", completed
                    ),
                    if_timed_out=self._wait_timed_out(position),
                ),
            ]
        cases.append(
            self._wait_case(
                waits.ABORT,
                position,
                f"aborted while waiting for {event}",
                self._wait_aborted(position),
            )
        )
        return cases

    def _approval_cases(self, position: int, approval: Wait) -> list[Case]:
        """An approval: approved, rejected, approved twice, approved then rejected, decided
        before the saga waits; never decided and decided as the timeout fires (if it has a
        timeout); an abort while it waits. Each decided as a person would, never by a signal."""
        name, completed = approval.name, self._completed()
        paused = self.pivot_before(position)
        cases = [
            self._wait_case(waits.APPROVED, position, f"{name} approved", completed),
            self._wait_case(
                waits.REJECTED,
                position,
                f"{name} rejected" + (" after the pivot" if paused else ""),
                self._wait_failed(position, "approval_rejected", pause=False),
            ),
            self._wait_case(waits.APPROVED_TWICE, position, f"{name} approved twice", completed),
            self._wait_case(
                waits.OVERRULED, position, f"{name} approved, then rejected", completed
            ),
            self._wait_case(
                waits.DECIDED_EARLY,
                position,
                f"{name} decided before the saga waits for it",
                completed,
            ),
        ]
        if has_timeout(approval):
            cases += [
                self._wait_case(
                    waits.NEVER, position, f"{name} never decided (timeout: {self._how(position)})"
                ),
                replace(
                    self._wait_case(
                        waits.RACE, position, f"{name} decided as the timeout fires", completed
                    ),
                    if_timed_out=self._wait_timed_out(position),
                ),
            ]
        cases.append(
            self._wait_case(
                waits.ABORT,
                position,
                f"aborted while waiting for {name}",
                self._wait_aborted(position),
            )
        )
        return cases

    def _how(self, position: int) -> str:
        """What the timeout of the wait at `position` does, as a case's id says it."""
        wait = self.stages[position]
        assert isinstance(wait, Wait)
        how = str(wait.on_timeout)
        if how == "compensate" and self.pivot_before(position):
            how = "pause, after the pivot"
        return how

    def _wait_case(
        self, kind: str, position: int, id: str, expected: Expected | None = None
    ) -> Case:
        wait = self.stages[position]
        scenario = Scenario(
            kind, wait.name, position, getattr(wait, "event", None), approval=is_approval(wait)
        )
        if expected is None:  # the timeout ends the wait
            expected = self._wait_timed_out(position)
        return Case(id=id, faults=(), expected=expected, matrix=self, scenario=scenario)

    def _completed(self) -> Expected:
        names = [stage.name for stage in self.stages]
        return Expected(
            status=SagaStatus.COMPLETED,
            error_code="",
            steps=dict.fromkeys(names, StepStatus.COMPLETED),
        )

    def _wait_timed_out(self, position: int) -> Expected:
        """The wait at `position` timed out: the saga goes on, pauses, or compensates the steps
        before it, as its `on_timeout` says (a compensation past a pivot pauses)."""
        wait = self.stages[position]
        assert isinstance(wait, Wait)
        if wait.on_timeout == "continue":
            return self._completed()
        return self._wait_failed(position, "wait_timed_out", pause=wait.on_timeout == "pause")

    def _wait_failed(self, position: int, code: str, *, pause: bool) -> Expected:
        """The wait at `position` failed with `code` (its timeout, a signal that fails it, a
        rejection): the saga compensates the steps before it, or pauses if `pause` or past a
        pivot."""
        paused = pause or self.pivot_before(position)
        owed = [] if paused else self.steps_before(position)
        statuses = self._statuses(position, StepStatus.FAILED)
        statuses |= dict.fromkeys(owed, StepStatus.COMPENSATED)
        return Expected(
            status=SagaStatus.FAILED if paused else SagaStatus.COMPENSATED,
            error_code=code,
            steps=statuses,
            compensated=tuple(owed),
        )

    def _wait_aborted(self, position: int) -> Expected:
        """An operator aborted the saga at the wait: it ends (pending again), and every step
        before it is compensated, in reverse order, past a pivot too."""
        owed = self.steps_before(position)
        statuses = self._statuses(position, StepStatus.PENDING)
        statuses |= dict.fromkeys(owed, StepStatus.COMPENSATED)
        return Expected(
            status=SagaStatus.COMPENSATED, error_code="", steps=statuses, compensated=tuple(owed)
        )

    # -- the cases of a group and of a child ------------------------------------------------------

    def _group_cases(self, position: int, group: Group) -> list[Case]:
        """Each member failing for good (a map's: its first item), the first two failing
        together, and the first completing after the second failed for good."""
        if group.step is None:
            # A child member fails when its child does: its child's steps carry the fault.
            steps = [m for m in group.members if isinstance(m, Step)]
            names = [f"{group.name}.{member.name}" for member in steps]
            cases = [self._member_fails(position, group, [name]) for name in names]
            for child in (m for m in group.members if isinstance(m, Child)):
                cases += self._child_member_fails(position, group, child)
        elif isinstance(group.step, Child):
            return []
        else:  # a map's members are its items, known only once the group begins
            names = [f"{group.name}[0]", f"{group.name}[1]"]
            cases = [self._member_fails(position, group, names[:1])]
        if len(names) > 1:
            first, second = names[:2]
            cases.append(self._member_fails(position, group, [first, second]))
            cases.append(self._member_fails(position, group, [second], held=first))
        return cases

    def _member_fails(
        self, position: int, group: Group, failing: list[str], held: str | None = None
    ) -> Case:
        """`failing` members fail for good (the first at once; `held`'s action waits for that
        failure, then completes). Beyond a map's `tolerated_failures`, the group fails: the
        members that completed are compensated, then the stages before it (a pause instead,
        past a pivot)."""
        name, paused = group.name, self.pivot_before(position)
        step = group.step or group.members[0]
        tolerated = len(failing) <= (group.tolerated_failures if group.step else 0)
        if held is not None:
            id = f"{held} completes after {failing[0]} failed for good"
        elif len(failing) > 1:
            id = f"{' and '.join(failing)} fail for good together"
        else:
            id = f"{failing[0]} fails for good"
        if tolerated:
            id += " (tolerated)"
        elif paused:
            id += " after the pivot"
        faults = [
            (member, FaultPoint.BEFORE_ACTION, BUSINESS_FAULT if held is None else HELD_FAULT)
            for member in failing
        ]
        if held is not None:
            faults.append((held, FaultPoint.BEFORE_ACTION, FaultEffect.HOLD))
        failed = {StepStatus.FAILED}
        if len(failing) > 1 and not tolerated:
            failed.add(StepStatus.PENDING)  # the other's failure came first: it never ran
        others: set[str] = {StepStatus.COMPENSATED, StepStatus.PENDING}
        if tolerated:
            expected = self._completed()
            others = {StepStatus.COMPLETED}
        else:
            owed = [] if paused else self.steps_before(position)
            status = StepStatus.FAILED if paused else StepStatus.COMPENSATED
            statuses = self._statuses(position, status)
            statuses |= dict.fromkeys(owed, StepStatus.COMPENSATED)
            expected = Expected(
                status=SagaStatus.FAILED if paused else SagaStatus.COMPENSATED,
                error_code=BUSINESS,
                steps=statuses,
                compensated=tuple(([] if paused else [name]) + owed),
            )
            if paused:  # what ran completes; what was sent and had not begun never will
                others = {StepStatus.COMPLETED, StepStatus.RUNNING, StepStatus.PENDING}
            elif getattr(step, "compensate_failed_step", False):
                failed.add(StepStatus.COMPENSATED)
        members = {f"{name}.*": frozenset(others)} | dict.fromkeys(failing, frozenset(failed))
        if held is not None:
            done = StepStatus.COMPLETED if tolerated or paused else StepStatus.COMPENSATED
            members[held] = frozenset({done})
            expected = replace(expected, completed_after=(held, failing[0]))
        expected = replace(
            expected,
            members=members,
            attempts={} if len(failing) > 1 else {failing[0]: 1},
            business_failure=failing[0] if len(failing) == 1 else None,
        )
        return self._case(id, faults, expected)

    def _child_member_fails(self, position: int, group: Group, child: Child) -> list[Case]:
        """The child of a group's child member fails (its first step fails for good): the
        member fails for good with the child's error, and its group as if a step member had
        failed. None for a child that waits or starts a child before its first step."""
        step = _first_step(child)
        if step is None:
            return []
        name = f"{group.name}.{child.name}"
        expected = self._member_fails(position, group, [name]).expected
        expected = replace(expected, children={name: SagaStatus.COMPENSATED})
        id = f"{name}: its child saga fails ({step.name} fails for good)"
        id += " after the pivot" if self.pivot_before(position) else ""
        fault = (f"{name}.{step.name}", FaultPoint.BEFORE_ACTION, BUSINESS_FAULT)
        return [self._case(id, [fault], expected)]

    def _child_fails(self, position: int, child: Child) -> list[Case]:
        """The child's first step fails for good: the child compensates, the stage fails with
        its error, and the parent compensates the stages before it (pauses, past a pivot).
        None for a child that waits or starts a child of its own before its first step."""
        step = _first_step(child)
        if step is None:
            return []
        expected = self._wait_failed(position, BUSINESS, pause=False)
        expected = replace(expected, children={child.name: SagaStatus.COMPENSATED})
        id = f"{child.name}: its child saga fails ({step.name} fails for good)"
        id += " after the pivot" if self.pivot_before(position) else ""
        fault = (f"{child.name}.{step.name}", FaultPoint.BEFORE_ACTION, BUSINESS_FAULT)
        return [self._case(id, [fault], expected)]

    def together(self) -> set[str]:
        """The groups that compensate their members concurrently."""
        return {group.name for group in self.groups if group.concurrent_compensation}

    def shaped(self, expected: Expected) -> Expected:
        """`expected` with what its stages' statuses say of their members and children, where
        the case said nothing: a group completed has its members completed, one compensated
        its members compensated (those that ran), one not begun no member; a child stage
        completed or compensated, its child the same; one not begun, no child."""
        members: dict[str, frozenset[str]] = {}
        children: dict[str, str] = {}
        for group in self.groups:
            status = expected.steps.get(group.name, StepStatus.PENDING)
            ran = status if status in (StepStatus.COMPLETED, StepStatus.COMPENSATED) else None
            members[f"{group.name}.*"] = frozenset([ran] if ran else [])
            if status == StepStatus.COMPLETED:  # its child members' children completed
                listed = group.members if group.step is None else ()
                for child in (m for m in listed if isinstance(m, Child)):
                    children[f"{group.name}.{child.name}"] = SagaStatus.COMPLETED
        for child in self.children:
            status = expected.steps.get(child.name, StepStatus.PENDING)
            # A child ends as its stage: completed, or compensated with its parent.
            ended = status in (StepStatus.COMPLETED, StepStatus.COMPENSATED)
            children[child.name] = str(status) if ended else ""
        return replace(
            expected,
            members=members | expected.members,
            children=children | expected.children,
        )

    def _case(self, id: str, faults: Sequence[tuple[str, str, str]], expected: Expected) -> Case:
        planted = tuple(PlannedFault(step, point, effect) for step, point, effect in faults)
        return Case(id=id, faults=planted, expected=expected, matrix=self)


BUSINESS_FAULT = FaultEffect.BUSINESS_ERROR
HELD_FAULT = FaultEffect.FAIL_WHILE_HELD


def shorten_retry_waits(saga: Saga, longest: float) -> None:
    """Cut the waits of the saga's copy of its steps' policies to `longest` seconds (under a
    definition version of its own: workers cache definitions by version)."""
    steps = list(SagaStep.objects.filter(saga=saga).order_by("index"))
    for step in steps:
        definition = step.definition
        kind = definition.get("kind")
        if kind == "group":  # its step members' policies (a child member has none)
            policies = [*definition["members"]]
            if "map" in definition:
                policies.append(definition["map"]["step"])
            policies = [p for p in policies if "kind" not in p]
        else:  # a wait (no attempts, no retries) or a child stage (its child's own) have none
            policies = [] if kind else [definition]
        for policy in [p[key] for p in policies for key in ("retry", "compensation_retry")]:
            policy["backoff"] = min(policy["backoff"], longest)
            policy["backoff_max"] = min(policy["backoff_max"], longest)
        step.definition = definition  # a copy of its own, in its row
        step.save(update_fields=["stored_definition"])
    version = snapshot_version([step.definition for step in steps])
    Saga.objects.filter(pk=saga.pk).update(definition_version=version)


def is_approval(stage: Step | Wait | Group | Child) -> bool:
    return bool(getattr(stage, "approval", False))


def has_timeout(wait: Wait) -> bool:
    return wait.timeout is not None or wait.until is not None


def _given(payload: Payload, saga: Saga) -> Any:
    return payload(saga) if callable(payload) else payload


def _status(saga: Saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def _duplicates_seen(saga: Saga, case: Case) -> bool:
    from .guarantees import duplicates_missing

    return not duplicates_missing(saga.pk, case.expected.duplicates)


def _first_step(child: Child) -> Step | None:
    """The first step of a child's saga, where the child reaches it before any wait or child
    (a definition ends with a step)."""
    stages = list(get_definition(child.saga).steps)
    step = next(s for s in stages if isinstance(s, Step))
    if any(isinstance(s, Wait | Child) for s in stages[: stages.index(step)]):
        return None
    return step
