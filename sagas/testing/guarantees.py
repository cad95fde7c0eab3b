"""What a case of the failure matrix must have guaranteed, read from the saga's rows and events.

Each check returns the broken guarantees as sentences; `Result.assert_guarantees()` fails with
all of them, the case's id and the saga's timeline, so a failure says what broke and where.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any
from uuid import UUID

from sagas.definitions import RetryPolicy
from sagas.engine.unit import attach
from sagas.models import (
    EventKind,
    Saga,
    SagaEvent,
    SagaMember,
    SagaSignal,
    SagaStep,
    SignalStatus,
    StepStatus,
)

from . import waits
from .models import Fault
from .waits import Played

if TYPE_CHECKING:
    from .matrix import Case, Expected

# How long after the turn's time a member's attempt may still have begun (see
# `nothing_forward_after_compensation_began`).
CROSSING = timedelta(seconds=1)
# Events after which a saga goes backward, whoever turned it.
TURNS_BACKWARD = (EventKind.COMPENSATION_STARTED, EventKind.OPERATOR_COMPENSATE)
# Events that end a wait: its event, its timeout, a signal that fails it, its condition.
ENDS_A_WAIT = (
    EventKind.WAIT_COMPLETED,
    EventKind.WAIT_TIMED_OUT,
    EventKind.WAIT_FAILED,
    "wait_skipped",
)


@dataclass
class Result:
    """How a case's saga ended: its rows and events, read once the workers let go of it."""

    case: Case
    saga: Saga
    steps: list[SagaStep]
    events: list[SagaEvent]
    unfinished: list[str]  # what did not happen in time
    played: Played = field(default_factory=Played)  # what the kit did at the waits
    signals: list[SagaSignal] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)
    # By the stage that started each (a group's member: `<group>.<member>`).
    children: dict[str, Saga] = field(default_factory=dict)

    @classmethod
    def read(
        cls, case: Case, saga_id: UUID, unfinished: list[str], played: Played | None = None
    ) -> Result:
        saga = Saga.objects.get(pk=saga_id)
        steps = list(SagaStep.objects.filter(saga=saga).order_by("index"))
        events = list(SagaEvent.objects.filter(saga=saga).order_by("id"))
        signals = list(SagaSignal.objects.filter(saga=saga).order_by("id"))
        members = members_of(saga.pk, steps)
        keys: dict[tuple[int, int | None], str] = {(m.stage, m.position): m.key for m in members}
        children = {}
        for child in Saga.objects.filter(parent=saga).order_by("created_at"):
            if child.parent_stage is None:
                continue
            at = (child.parent_stage, child.parent_member)
            key = steps[child.parent_stage].name if at[1] is None else keys.get(at, "")
            children[key] = child  # a stage's (a member's) last child
        return cls(
            case=case,
            saga=saga,
            steps=steps,
            events=events,
            unfinished=unfinished,
            played=played or Played(),
            signals=signals,
            members=members,
            children=children,
        )

    @property
    def expected(self) -> Expected:
        """Where the case must have ended: for an event racing the timeout, as the winner
        says."""
        case = self.case
        won = case.scenario is not None and self.played.timed_out.get(case.scenario.wait)
        expected = case.if_timed_out if case.if_timed_out is not None and won else case.expected
        return case.matrix.shaped(expected)

    @property
    def compensated(self) -> list[str]:
        """The steps compensated (a group's members, `<group>.<member>`), in the order their
        compensations committed. A group's own stage counts only where none of its members
        was owed anything."""
        return self.named(EventKind.STEP_COMPENSATED)

    def named(self, kind: str) -> list[str]:
        return [name_of(e, self.steps) for e in self.events if e.kind == kind]

    @property
    def groups(self) -> set[str]:
        return {step.name for step in self.steps if step.definition.get("kind") == "group"}

    def stage_of(self, name: str) -> str:
        """The stage a compensated (or completed) name belongs to: a member's, its group."""
        group, _, member = name.partition(".")
        return group if member and group in self.groups else name

    def problems(self) -> list[str]:
        """Every broken guarantee, as a sentence; empty when the case held."""
        problems = list(self.unfinished) + self.played.problems
        for check in CHECKS:
            problems += check(self)
        return problems + self.invariant_problems()

    def invariant_problems(self) -> list[str]:
        invariant = self.case.matrix.invariant
        if invariant is None:
            return []
        try:
            held = invariant(self.saga)
        except AssertionError as exc:
            return [f"the invariant failed: {exc}".strip()]
        return ["the invariant returned False"] if held is False else []

    def assert_guarantees(self) -> None:
        problems = self.problems()
        if problems:
            broken = "\n".join("  - " + p.replace("\n", "\n    ") for p in problems)
            raise AssertionError(
                f"case {self.case.id!r} (saga {self.saga.pk}) broke {len(problems)} "
                f"guarantee(s):\n{broken}\ntimeline:\n{self.timeline()}"
            )

    def timeline(self) -> str:
        return "\n".join(
            f"  {e.kind:<22} {e.step_name:<20} {json.dumps(e.detail)}" for e in self.events
        )

    def clear_faults(self) -> None:
        """Remove the case's faults (the fault is fixed), e.g. before an operator's retry."""
        Fault.objects.filter(saga=self.saga).delete()


# -- the checks ------------------------------------------------------------------------------


def final_state(result: Result) -> list[str]:
    saga, expected = result.saga, result.expected
    problems = []
    if saga.status != expected.status:
        problems.append(f"the saga ended {saga.status}, expected {expected.status}")
    if saga.error_code != expected.error_code:
        problems.append(f"its error code is {saga.error_code!r}, expected {expected.error_code!r}")
    return problems


def step_statuses(result: Result) -> list[str]:
    expected = result.expected.steps
    return [
        f"step {step.name} ended {step.status}, expected {expected[step.name]}"
        for step in result.steps
        if step.name in expected and step.status != expected[step.name]
    ]


def compensated_at_most_once(result: Result) -> list[str]:
    counts = Counter(result.compensated)
    return [f"{name} was compensated {n} times" for name, n in counts.items() if n > 1]


def compensated_in_reverse_order(result: Result) -> list[str]:
    """Stages in reverse; a group's members in reverse of their positions (items), or in any
    order where it compensates them concurrently, before the stages ahead of the group."""
    order: dict[str, tuple[int, int]] = {step.name: (step.index, 0) for step in result.steps}
    together = {s.index for s in result.steps if s.definition.get("concurrent_compensation")}
    order |= {m.key: (m.stage, 0 if m.stage in together else m.position) for m in result.members}
    names = list(dict.fromkeys(result.compensated))
    indices = [order.get(name, (-1, 0)) for name in names]
    if indices != sorted(indices, reverse=True):
        return [f"compensations ran in the order {names}, not the reverse of the steps'"]
    return []


def compensated_what_completed(result: Result) -> list[str]:
    """Exactly the completed steps (plus a `compensate_failed_step` one that may have started,
    and a child member whose child was in flight, aborted) were compensated, as the case
    expects."""
    completed = set(result.named(EventKind.STEP_COMPLETED))
    flagged = {s.name for s in result.steps if s.definition.get("compensate_failed_step")}
    flagged |= {
        m.key
        for m in result.members
        if m.definition.get("compensate_failed_step") or m.definition.get("kind") == "child"
    }
    problems = [
        f"{name} was compensated though it never completed"
        for name in dict.fromkeys(result.compensated)
        if name not in completed | flagged | result.groups
    ]
    problems += [
        f"{member.key} completed and was never compensated"
        for member in result.members
        if result.saga.status == "compensated"
        and member.key in completed
        and member.key not in result.compensated
    ]
    expected = set(result.expected.compensated)
    stages = {result.stage_of(name) for name in result.compensated}
    if stages != expected:
        problems.append(f"the steps compensated are {sorted(stages)}, expected {sorted(expected)}")
    return problems


def completed_once(result: Result) -> list[str]:
    counts = Counter(result.named(EventKind.STEP_COMPLETED))
    return [f"{name} completed {n} times" for name, n in counts.items() if n > 1]


def nothing_forward_after_compensation_began(result: Result) -> list[str]:
    """No step completed after the saga turned backward; a group's member only if its attempt
    had begun before (members in flight finish), and no member began after (by more than
    `CROSSING`: a member's check that its saga goes on and the commit that turns it back may
    cross, and the turn's time is taken before its commit)."""
    turned = next((e for e in result.events if e.kind in TURNS_BACKWARD), None)
    if turned is None:
        return []
    began = {member.key: member.started_at for member in result.members}
    problems = []
    for event in result.events:
        if event.kind != EventKind.STEP_COMPLETED or event.pk < turned.pk:
            continue
        name = name_of(event, result.steps)
        started = began.get(name)
        if started is None:
            problems.append(f"{name} completed after compensation began")
        elif started > turned.created_at + CROSSING:
            problems.append(f"{name} began after compensation began, and completed")
    return problems


def attempts_within_policy(result: Result) -> list[str]:
    problems = []
    stages: list[SagaStep | Member] = [*result.steps, *result.members]
    for step in stages:
        if "kind" in step.definition:
            continue  # a wait, a group (its members count) or a child stage
        for used, key in (
            (step.attempts, "retry"),
            (step.compensation_attempts, "compensation_retry"),
        ):
            allowed = RetryPolicy.from_dict(step.definition[key]).max_attempts
            if used > allowed:
                name = step.key if isinstance(step, Member) else step.name
                problems.append(f"{name} used {used} attempts ({key}), over its {allowed}")
    return problems


def attempts_as_expected(result: Result) -> list[str]:
    expected, problems = result.expected, []
    stages: list[SagaStep | Member] = [*result.steps, *result.members]
    for step in stages:
        names = step.names if isinstance(step, Member) else (step.name,)
        for used, wanted, what in (
            (step.attempts, _first(expected.attempts, names), "attempts"),
            (
                step.compensation_attempts,
                _first(expected.compensation_attempts, names),
                "compensation attempts",
            ),
        ):
            if wanted is not None and used != wanted:
                problems.append(f"{names[0]} used {used} {what}, expected {wanted}")
    return problems


def _first(by_name: dict[str, int], names: tuple[str, ...]) -> int | None:
    return next((by_name[name] for name in names if name in by_name), None)


def business_failure_not_retried(result: Result) -> list[str]:
    name = result.expected.business_failure
    named = {name} | {m.key for m in result.members if name in m.names}
    retried = sum(n in named for n in result.named(EventKind.STEP_RETRYING)) if name else 0
    return [f"the business failure of {name} was retried {retried} times"] if retried else []


def duplicates_delivered(result: Result) -> list[str]:
    missing = duplicates_missing(result.saga.pk, result.expected.duplicates)
    return [f"no duplicate of {name}'s {kind} message arrived" for name, kind in missing]


def duplicates_missing(saga_id: UUID, wanted: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
    """The (step, "action" or "compensation") of `wanted` whose second delivery was not seen:
    neither ignored as a duplicate nor (wrongly) acted on a second time. A group's name stands
    for each of its members that ran that far (a child member's action sends no message)."""
    steps = list(SagaStep.objects.filter(saga_id=saga_id).order_by("index"))
    done: dict[str, str] = {
        EventKind.STEP_COMPLETED: "action",
        EventKind.STEP_COMPENSATED: "compensation",
    }
    kinds = [*done, EventKind.DUPLICATE_IGNORED]
    events = SagaEvent.objects.filter(saga_id=saga_id, kind__in=kinds)
    ignored, twice = set(), Counter[tuple[str, str]]()
    for event in events.only("step_index", "step_name", "kind", "detail"):
        name = name_of(event, steps)
        if event.kind == EventKind.DUPLICATE_IGNORED:
            ignored.add((name, event.detail.get("of")))
        else:
            twice[(name, done[event.kind])] += 1
    acted = {pair for pair, n in twice.items() if n > 1}
    groups = {step.name for step in steps if step.definition.get("kind") == "group"}
    members = members_of(saga_id, steps) if groups & {name for name, _ in wanted} else []
    ran = {"action": (StepStatus.COMPLETED, StepStatus.COMPENSATED)}
    expanded = []
    for name, kind in wanted:
        if name not in groups:
            expanded.append((name, kind))
            continue
        reached = ran.get(kind, (StepStatus.COMPENSATED,))
        expanded += [
            (m.key, kind)
            for m in members
            if m.group == name
            and m.status in reached
            # A child member's action is its child's: no message of its own.
            and not (kind == "action" and m.definition.get("kind") == "child")
        ]
    return [pair for pair in expanded if pair not in ignored | acted]


def name_of(event: SagaEvent, steps: list[SagaStep]) -> str:
    """Who an event is about: its step, or a group's member as `<group>.<member>` (a map's
    member by its item's key, where the timeline's name is its step's)."""
    member = event.detail.get("member") if isinstance(event.detail, dict) else None
    index = event.step_index
    if member is None or index is None or index >= len(steps):
        return event.step_name
    return f"{steps[index].name}.{member}"


@dataclass(frozen=True)
class Member:
    """A group member as a case reads it: `key` is `<group>.<member>`; `names`, what a case may
    call it (that, and `<group>[<position>]`); `definition`, its step's, from its group's."""

    key: str
    names: tuple[str, ...]
    group: str
    stage: int
    position: int
    status: str
    attempts: int
    compensation_attempts: int
    started_at: datetime | None
    definition: dict[str, Any]


def members_of(saga_id: UUID, steps: list[SagaStep]) -> list[Member]:
    """A saga's group members, in their groups' order, then their positions."""
    members = []
    for row in SagaMember.objects.filter(saga_id=saga_id).order_by("stage", "position"):
        attach(row, steps[row.stage])
        key = f"{row.group}.{row.name}"  # type: ignore[attr-defined]
        members.append(
            Member(
                key=key,
                names=(key, f"{row.group}[{row.position}]"),  # type: ignore[attr-defined]
                group=row.group,  # type: ignore[attr-defined]
                stage=row.stage,
                position=row.position,
                status=row.status,
                attempts=row.attempts,
                compensation_attempts=row.compensation_attempts,
                started_at=row.started_at,
                definition=row.definition,  # type: ignore[attr-defined]
            )
        )
    return members


# -- groups and children --------------------------------------------------------------------------


def members_as_expected(result: Result) -> list[str]:
    """Each member ended in a status its case allows (by its name, its position, or its
    group's `<group>.*`)."""
    expected, problems = result.expected.members, []
    for member in result.members:
        names = (*member.names, f"{member.group}.*")
        allowed = next((expected[name] for name in names if name in expected), None)
        if allowed is not None and member.status not in allowed:
            wanted = " or ".join(sorted(allowed)) or "no member (its group never began)"
            problems.append(f"member {member.key} ended {member.status}, expected {wanted}")
    return problems


def completed_after(result: Result) -> list[str]:
    """A held member's action completed after the other member's final failure."""
    if result.expected.completed_after is None:
        return []
    held, failing = result.expected.completed_after
    keys = {name: m.key for m in result.members for name in m.names}
    moments: dict[tuple[str, str], int] = {}
    for event in result.events:
        moments.setdefault((name_of(event, result.steps), event.kind), event.pk)
    completed = moments.get((keys.get(held, held), EventKind.STEP_COMPLETED))
    failed = moments.get((keys.get(failing, failing), EventKind.STEP_FAILED))
    if completed is None or failed is None or completed < failed:
        return [f"{held} did not complete after {failing} failed for good"]
    return []


def children_as_expected(result: Result) -> list[str]:
    """Each child stage's child ended as its case expects (or none started); a compensated
    child undid each of its steps that completed exactly once, in reverse order."""
    problems = []
    for stage, wanted in result.expected.children.items():
        child = result.children.get(stage)
        status = child.status if child is not None else ""
        if status != wanted:
            problems.append(
                f"the child of {stage} ended {status or 'unstarted'}, "
                f"expected {wanted or 'none started'}"
            )
        if child is None or status != "compensated":
            continue
        steps = list(SagaStep.objects.filter(saga=child).order_by("index"))
        events = SagaEvent.objects.filter(saga=child).order_by("id")
        completed = Counter[str]()
        undone: list[str] = []
        for event in events:
            if event.kind == EventKind.STEP_COMPLETED:
                completed[name_of(event, steps)] += 1
            elif event.kind == EventKind.STEP_COMPENSATED:
                undone.append(name_of(event, steps))
        groups = {s.name for s in steps if s.definition.get("kind") == "group"}
        for name in completed:
            if name not in groups and undone.count(name) != 1:
                problems.append(
                    f"{name} of the child of {stage} completed and was compensated "
                    f"{undone.count(name)} times"
                )
        order = {s.name: s.index for s in steps}
        indices = [order.get(name.partition(".")[0], -1) for name in undone]
        if indices != sorted(indices, reverse=True):
            problems.append(f"the child of {stage} compensated in the order {undone}")
    return problems


# -- waits and signals ----------------------------------------------------------------------------


def waits_ended_once(result: Result) -> list[str]:
    ended = Counter(e.step_name for e in result.events if e.kind in ENDS_A_WAIT)
    return [f"the wait {name} ended {n} times" for name, n in ended.items() if n > 1]


def signals_applied_once(result: Result) -> list[str]:
    """A wait that an event completed holds the payload of the one signal it consumed; a
    signal refused, invalid or repeated changed nothing; none is left kept once the saga
    ended (it is discarded)."""
    problems = []
    by_id = {signal.pk: signal for signal in result.signals}
    names = {step.index: step.name for step in result.steps}
    consumed = Counter(
        names.get(s.stage, str(s.stage))
        for s in result.signals
        if s.status == SignalStatus.CONSUMED and s.stage is not None
    )
    problems += [
        f"{n} signals were consumed by the wait {name}" for name, n in consumed.items() if n > 1
    ]
    outputs = {step.name: step.output for step in result.steps}
    for event in result.events:
        if event.kind != EventKind.WAIT_COMPLETED:
            continue
        signal = by_id.get(event.detail.get("signal"))
        if signal is None or signal.status != SignalStatus.CONSUMED:
            problems.append(f"the wait {event.step_name} completed by a signal not consumed")
        elif outputs.get(event.step_name) != signal.payload:
            problems.append(
                f"the output of the wait {event.step_name} is {outputs.get(event.step_name)!r}, "
                f"not the payload of the signal it consumed ({signal.payload!r})"
            )
    kept = [s.pk for s in result.signals if s.status == SignalStatus.KEPT]
    if kept and result.saga.is_final:
        problems.append(f"signals {kept} were still kept after the saga ended")
    return problems


def decisions_recorded(result: Result) -> list[str]:
    """An approval ended by a decision names it on the timeline (the decision, who took it,
    their note), as the signal that carried it: approved, it completed with the decision as
    its output; rejected, it failed (`approval_rejected`)."""
    approvals = {step.name: step for step in result.steps if step.definition.get("approval")}
    by_id = {signal.pk: signal for signal in result.signals}
    problems = []
    for event in result.events:
        step = approvals.get(event.step_name)
        if step is None or event.kind not in (EventKind.WAIT_COMPLETED, EventKind.WAIT_FAILED):
            continue
        signal = by_id.get(event.detail.get("signal"))
        if signal is None:
            continue  # not ended by a decision (a condition or an until that raised)
        decision = signal.payload if isinstance(signal.payload, dict) else {}
        recorded = {key: event.detail.get(key) for key in ("decision", "by", "note")}
        if recorded != {key: decision.get(key) for key in recorded}:
            problems.append(
                f"the end of the approval {step.name} records {recorded}, not the decision "
                f"that ended it ({signal.payload!r})"
            )
        approved = decision.get("decision") == "approved"
        if event.kind != (EventKind.WAIT_COMPLETED if approved else EventKind.WAIT_FAILED):
            problems.append(
                f"the approval {step.name}, {decision.get('decision')}, ended by {event.kind}"
            )
        elif not approved and (signal.fail or {}).get("code") != "approval_rejected":
            problems.append(f"the rejection of {step.name} failed it with {signal.fail!r}")
    return problems


def the_scenario_played_out(result: Result) -> list[str]:
    """What the case did at its wait had the outcome the framework promises."""
    scenario, played = result.case.scenario, result.played
    if scenario is None:
        return []
    skipped = any(e.kind == "wait_skipped" and e.step_name == scenario.wait for e in result.events)
    if skipped:
        return [
            f"the wait {scenario.wait} was skipped (its condition was false for this input): "
            "give the matrix an input for which the saga waits there"
        ]
    early = scenario.kind in (waits.EARLY, waits.DECIDED_EARLY)
    if not early and scenario.wait not in played.reached:
        return [f"the saga never waited at {scenario.wait}"]
    if scenario.approval:
        return _the_decisions_played_out(result)
    return _the_events_played_out(result)


def _outcomes(result: Result, problems: list[str]) -> Callable[..., None]:
    """`outcome(why, status, stored_as=...)`: each signal (or decision) the kit sent for `why`
    had that outcome, and its row ended `stored_as`; else a problem."""
    scenario, played = result.case.scenario, result.played
    assert scenario is not None
    rows = {signal.pk: signal for signal in result.signals}

    def said(why: str) -> str:
        if scenario.approval:
            return f"the decision on {scenario.wait} ({why})"
        return f"the {scenario.event} sent {why}"

    def outcome(why: str, status: str, *, stored_as: str | None = None) -> None:
        for sent in played.of(why):
            if sent.status != status:
                reason = f" ({sent.reason})" if sent.reason else ""
                problems.append(f"{said(why)} was {sent.status}{reason}, not {status}")
            row = rows.get(sent.signal_id) if sent.signal_id else None
            if stored_as and (row is None or row.status != stored_as):
                problems.append(
                    f"{said(why)} ended {row.status if row else 'unstored'}, not {stored_as}"
                )

    return outcome


def _repeated(result: Result, problems: list[str]) -> None:
    """The second of two sends (or decisions) with one key is the first one's outcome."""
    scenario, played = result.case.scenario, result.played
    assert scenario is not None
    first, again = played.of("first"), played.of("again")
    if first and again and not (again[0].repeated and again[0].signal_id == first[0].signal_id):
        what = f"decision on {scenario.wait}" if scenario.approval else str(scenario.event)
        problems.append(f"the {what} sent again was not the first one repeated")


def _the_race(result: Result, problems: list[str]) -> None:
    """Racing the timeout, exactly one of the signal (or decision) and the timeout ended the
    wait; the one that lost the race was refused."""
    scenario, played = result.case.scenario, result.played
    assert scenario is not None
    timed_out = played.timed_out.get(scenario.wait)
    sent = next(iter(played.of("racing")), None)
    won = sent is not None and sent.status == SignalStatus.CONSUMED
    if won == bool(timed_out):
        what = "decision" if scenario.approval else "signal"
        problems.append(
            f"racing the timeout, the {what} was {sent.status if sent else 'not sent'} and "
            f"the timeout {'ended' if timed_out else 'did not end'} the wait: "
            "exactly one of them must"
        )
    elif timed_out:
        _outcomes(result, problems)("racing", SignalStatus.REFUSED, stored_as=SignalStatus.REFUSED)


def _the_decisions_played_out(result: Result) -> list[str]:
    """An approval's case: each decision had the outcome promised, and stored what it must."""
    scenario, played = result.case.scenario, result.played
    assert scenario is not None
    problems: list[str] = []
    outcome = _outcomes(result, problems)
    stored = [s for s in result.signals if s.event == scenario.event]
    outputs = {step.name: step.output for step in result.steps}
    kind = scenario.kind
    if kind == waits.APPROVED:
        outcome("approved", SignalStatus.CONSUMED)
        sent = next(iter(played.of("approved")), None)
        if sent is not None and outputs.get(scenario.wait) != sent.payload:
            problems.append(
                f"the output of {scenario.wait} is {outputs.get(scenario.wait)!r}, not the "
                f"decision {sent.payload!r}"
            )
    elif kind == waits.REJECTED:
        outcome("rejected", SignalStatus.CONSUMED, stored_as=SignalStatus.CONSUMED)
        step = next((s for s in result.steps if s.name == scenario.wait), None)
        if step is not None and step.error_code != "approval_rejected":
            problems.append(
                f"the rejected {scenario.wait} failed with {step.error_code!r}, "
                "not 'approval_rejected'"
            )
    elif kind == waits.APPROVED_TWICE:
        outcome("first", SignalStatus.CONSUMED)
        outcome("again", SignalStatus.CONSUMED)
        _repeated(result, problems)
        if len(stored) != 1:
            problems.append(f"{len(stored)} decisions on {scenario.wait} stored, expected 1")
    elif kind == waits.OVERRULED:
        outcome("approved", SignalStatus.CONSUMED)
        outcome("then rejected", SignalStatus.REFUSED, stored_as=SignalStatus.REFUSED)
    elif kind == waits.DECIDED_EARLY:
        if scenario.wait not in played.reached:
            problems.append(
                f"the saga never waited at {scenario.wait}: a decision taken before was applied"
            )
        outcome("early", waits.NOT_WAITING)
        if len(stored) != 1:
            problems.append(
                f"{len(stored)} decisions on {scenario.wait} stored, expected 1 (the one "
                "taken once the saga waited)"
            )
        outcome("on time", SignalStatus.CONSUMED)
    elif kind == waits.NEVER:
        if not played.timed_out.get(scenario.wait):
            problems.append(f"the timeout did not end {scenario.wait}")
    elif kind == waits.RACE:
        _the_race(result, problems)
    elif kind == waits.ABORT:
        if not played.aborted:
            problems.append(f"the saga was not aborted at {scenario.wait}")
        outcome("after the abort", SignalStatus.REFUSED, stored_as=SignalStatus.REFUSED)
    return problems


def _the_events_played_out(result: Result) -> list[str]:
    """A case of a wait for an event (or a timer)."""
    scenario, played = result.case.scenario, result.played
    assert scenario is not None
    problems: list[str] = []
    outcome = _outcomes(result, problems)
    timed_out = played.timed_out.get(scenario.wait)
    kind = scenario.kind
    if kind == waits.EARLY:
        outcome("early", SignalStatus.KEPT, stored_as=SignalStatus.CONSUMED)
    elif kind == waits.ON_TIME:
        outcome("on time", SignalStatus.CONSUMED)
    elif kind == waits.TWICE:
        outcome("first", SignalStatus.CONSUMED)
        outcome("again", SignalStatus.CONSUMED)
        _repeated(result, problems)
    elif kind == waits.INVALID:
        outcome("invalid", "invalid")
        if played.still_waiting is False:
            problems.append(f"after the invalid payloads, {scenario.wait} no longer waited")
        stored = [s for s in result.signals if s.event == scenario.event]
        if len(stored) != 1:
            problems.append(f"{len(stored)} signals of {scenario.event} stored, expected 1")
        outcome("on time", SignalStatus.CONSUMED)
    elif kind == waits.FAILS:
        outcome("failing", SignalStatus.CONSUMED, stored_as=SignalStatus.CONSUMED)
        code = waits.FAILURE["code"]
        step = next((s for s in result.steps if s.name == scenario.wait), None)
        if step is not None and step.error_code != code:
            problems.append(
                f"the failed {scenario.wait} has the error {step.error_code!r}, not {code!r}"
            )
    elif kind == waits.NEVER:
        if not timed_out:
            problems.append(f"the timeout did not end {scenario.wait}")
    elif kind == waits.LATE:
        if not timed_out:
            problems.append(f"the timeout did not end {scenario.wait}")
        outcome("late", SignalStatus.REFUSED, stored_as=SignalStatus.REFUSED)
    elif kind == waits.RACE:
        _the_race(result, problems)
    elif kind == waits.ABORT:
        if not played.aborted:
            problems.append(f"the saga was not aborted at {scenario.wait}")
        outcome("after the abort", SignalStatus.REFUSED, stored_as=SignalStatus.REFUSED)
    return problems


def reconciliation_agrees(result: Result) -> list[str]:
    """A final saga's definition's reconciliation check (`SagaDefinition.reconcile`) finds
    the outside world agreeing with its outcome: what the saga did, its compensations undid,
    whatever the faults. Run here, as the sweeper would, without recording anything."""
    from django.db import transaction

    from sagas.definitions import import_callable
    from sagas.engine import reconcile
    from sagas.engine.unit import peek

    path = reconcile.check_of(result.saga.name)
    if path is None or not result.saga.is_final:
        return []
    with transaction.atomic():
        ctx = reconcile.context(peek(result.saga.pk))
    found = import_callable(path)(ctx) or []
    return [f"its reconciliation check found {d.code}: {d.message}" for d in found]


CHECKS: list[Callable[[Result], list[str]]] = [
    final_state,
    step_statuses,
    compensated_at_most_once,
    compensated_in_reverse_order,
    compensated_what_completed,
    completed_once,
    nothing_forward_after_compensation_began,
    attempts_within_policy,
    attempts_as_expected,
    business_failure_not_retried,
    duplicates_delivered,
    members_as_expected,
    completed_after,
    children_as_expected,
    waits_ended_once,
    signals_applied_once,
    decisions_recorded,
    the_scenario_played_out,
    reconciliation_agrees,
]
