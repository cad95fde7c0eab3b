"""A Hypothesis stateful test of groups and child sagas: the same invariants hold after every
rule, whatever the order in which messages arrive.

As tests/test_engine_stateful.py does for the straight line, the state machine drives the real
engine in-process against the real PostgreSQL test database. No Celery message is sent: the
dispatch functions append to an in-memory broker (chains of steps and compensations, each
member's task, the chains' error callbacks, `child_ended`), and rules deliver them in any
order: a member before another, the join's send lost, a member's message twice, a worker killed
after a member's effect (the message comes back and its attempt is counted), error callbacks
lost or repeated, the sweeper, an operator's abort, retry and resolve, failures planted in
members, in the child and in compensations.

The saga: a step, a group of three members (two at a time; the middle one compensated
whenever it may have started; in some sagas, their compensations at the same time, each a
message of its own), a child saga of two steps, a last step; in others, the child is the
group's third member instead of a stage of its own. Every step, member and
child step takes one unit of a product of its own, in its transaction, and gives it back when
compensated: the stock says, after every rule, that each effect is in place exactly when its
row says so.

Invariants: each effect is in place iff its row's status says it completed and is not yet
undone; no member and no child step completes after its saga turned back; nothing is
compensated twice; at the end, with the faults stopped, every saga is final, a completed one
with all its effects in place once, a compensated one (and its child) with none.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db.models import F
from django.utils import timezone
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from inventory.models import Product
from sagas import engine, services, tasks
from sagas.definitions import (
    Child,
    Group,
    RetryPolicy,
    SagaDefinition,
    Step,
    StepContext,
    register,
)
from sagas.engine import dispatch, sweeper
from sagas.exceptions import BusinessError, InvalidTransition, SagaBusy, TransientError
from sagas.models import EventKind, Saga, SagaEvent, SagaMember, SagaNotice, SagaStep

pytestmark = pytest.mark.django_db(transaction=True)

FAST = RetryPolicy(max_attempts=2, backoff=0.01, backoff_max=0.01, jitter=False)
STOCK = 5
# Planted faults, by (order, step or member name): "business", "transient" (every attempt),
# "undo" (its compensation fails, transiently, every attempt).
FAULTS: dict[tuple[str, str], str] = {}
STATS: Counter[Any] = Counter()


class WorkerDied(BaseException):
    """The worker process died after the action's effect, before its commit."""


KILL: dict[str, bool] = {"next": False}


def _sku(ctx: StepContext) -> str:
    return f"{ctx.input['order']}:{ctx.step}"


def take(ctx: StepContext) -> dict:
    Product.objects.filter(sku=_sku(ctx)).update(stock_on_hand=F("stock_on_hand") - 1)
    fault = FAULTS.get((ctx.input["order"], ctx.step))
    if fault == "business":
        raise BusinessError("No.", code="declined")
    if fault == "transient":
        raise TransientError("Later.", code="later")
    if KILL["next"]:
        KILL["next"] = False
        raise WorkerDied()
    return {"sku": _sku(ctx)}


def give(ctx: StepContext) -> None:
    if FAULTS.get((ctx.input["order"], ctx.step)) == "undo":
        raise TransientError("Cannot undo now.", code="undo_down")
    if ctx.output:
        Product.objects.filter(sku=ctx.output["sku"]).update(stock_on_hand=F("stock_on_hand") + 1)


def step(name: str, **options: Any) -> Step:
    return Step(name, take, give, retry=FAST, compensation_retry=FAST, **options)


CHILD_STEPS = ("c_book", "c_label")
MEMBERS = ("m0", "m1", "m2")
PARENT_STEPS = ("s_first", "s_last")
NAMES = (*PARENT_STEPS, *MEMBERS, *CHILD_STEPS)

register(SagaDefinition(name="sf_child", steps=[step(n) for n in CHILD_STEPS]))


def parent(name: str, **group_options: Any) -> SagaDefinition:
    return SagaDefinition(
        name=name,
        steps=[
            step("s_first"),
            Group(
                "g",
                members=[step("m0"), step("m1", compensate_failed_step=True), step("m2")],
                concurrency=2,
                **group_options,
            ),
            Child("ch", saga="sf_child"),
            step("s_last"),
        ],
    )


register(parent("sf_parent"))
# Its members' compensations at the same time, each a message of its own.
register(parent("sf_parent_together", concurrent_compensation=True))
# The child as the group's third member (whose name takes no stock of its own) instead of a
# stage of its own.
CHILD_MEMBER = "mc"
register(
    SagaDefinition(
        name="sf_parent_member_child",
        steps=[
            step("s_first"),
            Group(
                "g",
                members=[
                    step("m0"),
                    step("m1", compensate_failed_step=True),
                    Child(CHILD_MEMBER, saga="sf_child"),
                ],
                concurrency=2,
            ),
            step("s_last"),
        ],
    )
)
SHAPES = ("sf_parent", "sf_parent_together", "sf_parent_member_child")

STEP, COMPENSATION = "step", "compensation"
STEP_FAILED = "sagas.tasks.StepFailed"


@dataclass
class Chain:
    kind: str
    saga_id: str
    epoch: int
    entries: list[tuple[int, int | None]]
    redelivered: bool = False


@dataclass
class Callback:
    kind: str
    saga_id: str
    epoch: int
    task_id: str


class Broker:
    def __init__(self) -> None:
        self.chains: list[Chain] = []
        self.callbacks: list[Callback] = []
        self.ended: list[tuple[str, int, int | None]] = []

    def send_steps(self, saga_id: str, epoch: int, steps: list, countdown: float) -> None:
        self.chains.append(Chain(STEP, saga_id, epoch, [(i, None) for i, _ in steps]))

    def send_members(
        self, saga_id: str, epoch: int, index: int, members: list, countdown: float
    ) -> None:
        for position, _ in members:
            self.chains.append(Chain(STEP, saga_id, epoch, [(index, position)]))

    def send_compensations(self, saga_id: str, epoch: int, entries: list, countdown: float) -> None:
        self.chains.append(Chain(COMPENSATION, saga_id, epoch, [(e[0], e[2]) for e in entries]))

    def send_member_compensations(
        self, saga_id: str, epoch: int, entries: list, countdown: float
    ) -> None:
        for entry in entries:
            self.chains.append(Chain(COMPENSATION, saga_id, epoch, [(entry[0], entry[2])]))

    def send_child_ended(self, parent_id: str, stage: int, member: int | None = None) -> None:
        self.ended.append((parent_id, stage, member))


def child_ended(parent_id: str, stage: int, member: int | None) -> None:
    """What the task `sagas.child_ended` does."""
    tasks.child_ended.run(parent_id, stage, member)
    STATS["child member ended" if member is not None else "child ended"] += 1


BROKER = Broker()


def deliver(chain: Chain, *, kill: bool = False) -> None:
    forward = chain.kind == STEP
    index, member = chain.entries[0]
    if chain.redelivered:
        chain.redelivered = False
        counted = engine.attempt_lost(
            chain.saga_id, index, forward=forward, why="redelivered", member=member
        )
        STATS["attempt counted as lost"] += counted is not None
        if counted is not None:
            return _after(chain, counted, index, member)
    KILL["next"] = kill and forward
    try:
        outcome = tasks.attempt(chain.saga_id, index, chain.epoch, forward=forward, member=member)
    except WorkerDied:
        STATS["killed"] += 1
        chain.redelivered = True  # acks late: the message comes back
        return
    finally:
        KILL["next"] = False
    _after(chain, outcome, index, member)


def _after(chain: Chain, outcome: Any, index: int, member: int | None) -> None:
    STATS[(chain.kind, outcome.kind, member is not None)] += 1
    if outcome.kind in ("done", "duplicate"):
        chain.entries.pop(0)
        if not chain.entries:
            BROKER.chains.remove(chain)
    elif outcome.kind in ("stop", "fail"):
        BROKER.chains.remove(chain)
        if outcome.kind == "fail":
            task_id = dispatch.task_id(chain.saga_id, chain.epoch, index, member)
            BROKER.callbacks.append(Callback(chain.kind, chain.saga_id, chain.epoch, task_id))
    else:  # retry: the message comes again (no time passes here: fences pass at once)
        passed = timezone.now() - timedelta(seconds=1)
        for model in (SagaStep, SagaMember):
            model.objects.filter(saga_id=chain.saga_id, fenced_until__gt=passed).update(
                fenced_until=passed
            )


def run_callback(callback: Callback) -> None:
    handle = engine.step_chain_failed if callback.kind == STEP else engine.compensation_chain_failed
    failed = dispatch.failed_index(callback.task_id, callback.saga_id, callback.epoch)
    cause, task_id = STEP_FAILED, callback.task_id
    handle(callback.saga_id, callback.epoch, failed=failed, cause=cause, task_id=task_id)
    STATS[("callback", callback.kind)] += 1


def sweep(order: list[str]) -> None:
    now = timezone.now()
    for i, saga_id in enumerate(order):
        Saga.objects.filter(pk=saga_id).update(updated_at=now - timedelta(seconds=30 - i / 1000))
    sweeper.sweep(stale_after=timedelta(seconds=1), max_recoveries=1000)
    STATS["sweep"] += 1


class ShapesMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        BROKER.__init__()
        FAULTS.clear()
        for model in (SagaNotice, SagaEvent, SagaMember, SagaStep, Product):
            model.objects.all().delete()
        Saga.objects.filter(parent__isnull=False).delete()
        Saga.objects.all().delete()
        self.orders: list[str] = []
        self.sagas: list[str] = []

    def saga(self, i: int) -> str:
        return self.sagas[i % len(self.sagas)]

    @initialize(
        faults=st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from(["business", "transient", "undo"])),
            max_size=2,
        ),
        shape=st.sampled_from(SHAPES),
    )
    def begin(self, faults: list[tuple[str, str]], shape: str) -> None:
        self.start(faults, shape)

    @rule(
        faults=st.lists(
            st.tuples(st.sampled_from(NAMES), st.sampled_from(["business", "transient", "undo"])),
            max_size=2,
        ),
        shape=st.sampled_from(SHAPES),
    )
    def start(self, faults: list[tuple[str, str]], shape: str = "sf_parent") -> None:
        if len(self.sagas) >= 3:
            return
        order = f"o{len(self.orders)}"
        self.orders.append(order)
        Product.objects.bulk_create(
            Product(sku=f"{order}:{n}", name=n, price=1, stock_on_hand=STOCK) for n in NAMES
        )
        for name, kind in faults:
            FAULTS[(order, name)] = kind
        saga, _ = services.saga_start(name=shape, input={"order": order})
        self.sagas.append(str(saga.pk))

    @rule(i=st.integers(0, 20), how=st.sampled_from(["once", "twice", "killed", "lost"]))
    def deliver(self, i: int, how: str) -> None:
        if not BROKER.chains:
            return
        chain = BROKER.chains[i % len(BROKER.chains)]
        if how == "lost":
            BROKER.chains.remove(chain)
            STATS["lost"] += 1
            return
        if how == "twice":
            copy = Chain(chain.kind, chain.saga_id, chain.epoch, list(chain.entries))
            BROKER.chains.append(copy)
        deliver(chain, kill=how == "killed")

    @rule(i=st.integers(0, 20), fate=st.sampled_from(["run", "repeated", "lost"]))
    def callback(self, i: int, fate: str) -> None:
        if not BROKER.callbacks:
            return
        callback = BROKER.callbacks.pop(i % len(BROKER.callbacks))
        if fate != "lost":
            run_callback(callback)
        if fate == "repeated":
            run_callback(callback)

    @rule(i=st.integers(0, 20), lost=st.booleans())
    def child_ended(self, i: int, lost: bool) -> None:
        if not BROKER.ended:
            return
        ended = BROKER.ended.pop(i % len(BROKER.ended))
        if not lost:
            child_ended(*ended)

    @rule()
    def sweeper(self) -> None:
        sweep(self.sagas + list(self.children()))

    @rule(i=st.integers(0, 2), action=st.sampled_from(["compensate", "retry", "resolve"]))
    def operator(self, i: int, action: str) -> None:
        if not self.sagas:
            return
        targets = [self.saga(i), *[str(c) for c in self.children(self.saga(i))]]
        for saga_id in targets:
            try:
                if action == "compensate":
                    services.saga_compensate(saga_id=saga_id, actor="ops")
                elif action == "retry":
                    services.saga_retry(saga_id=saga_id, actor="ops")
                else:
                    self.resolve(saga_id)
                STATS[("operator", action)] += 1
            except (InvalidTransition, SagaBusy):
                pass

    @rule(name=st.sampled_from(NAMES))
    def fix(self, name: str) -> None:
        """A planted fault is fixed (its system is back)."""
        for key in [k for k in FAULTS if k[1] == name]:
            del FAULTS[key]

    def resolve(self, saga_id: str) -> None:
        """Resolve a compensation that failed, after undoing its effect by hand."""
        for stage in SagaStep.objects.filter(saga_id=saga_id, status="compensation_failed"):
            if "kind" not in stage.definition:
                undo_by_hand(stage.output)
                services.saga_step_resolve(saga_id=saga_id, index=stage.index, actor="ops")
                return
        for member in SagaMember.objects.filter(saga_id=saga_id, status="compensation_failed"):
            undo_by_hand(member.output)
            services.saga_step_resolve(
                saga_id=saga_id, index=member.stage, member=member.position, actor="ops"
            )
            return

    def children(self, saga_id: str | None = None) -> list[Any]:
        found = Saga.objects.filter(parent__isnull=False)
        if saga_id is not None:
            found = found.filter(parent_id=saga_id)
        return list(found.values_list("pk", flat=True))

    @invariant()
    def effects_match_the_rows(self) -> None:
        check_effects(final=False)

    def teardown(self) -> None:
        # The faults that would stop a saga forever stop; a business failure stays what it
        # is: its saga compensates.
        for key in [k for k, kind in FAULTS.items() if kind != "business"]:
            del FAULTS[key]
        drive_to_the_end(self)
        check_effects(final=True)


def undo_by_hand(output: Any) -> None:
    if output:
        Product.objects.filter(sku=output["sku"]).update(stock_on_hand=F("stock_on_hand") + 1)


IN_PLACE = {"completed", "compensating", "compensation_failed"}
BACKWARD_EVENTS = {
    EventKind.COMPENSATION_STARTED,
    EventKind.OPERATOR_COMPENSATE,
    EventKind.DEADLINE_PASSED,
}


def check_effects(*, final: bool) -> None:
    stock = dict(Product.objects.values_list("sku", "stock_on_hand"))
    for saga in Saga.objects.all():
        order = saga.input["order"]
        rows: list[tuple[str, str, Any]] = []
        for stage in SagaStep.objects.filter(saga=saga):
            if "kind" not in stage.definition:
                rows.append((stage.name, stage.status, stage))
        for member in SagaMember.objects.filter(saga=saga).exclude(name=CHILD_MEMBER):
            rows.append((member.name, member.status, member))  # a child's own rows say
        for name, status, row in rows:
            # Owed a compensation with no output: a member that failed, undone in case it
            # half-happened (`compensate_failed_step`): nothing of it is in place.
            in_place = status == "completed" or (status in IN_PLACE and row.output is not None)
            expected = STOCK - 1 if in_place else STOCK
            assert stock[f"{order}:{name}"] == expected, (
                f"{saga.name} {order} {name}: {status}, stock {stock[f'{order}:{name}']}"
            )
        # Nothing runs forward after its saga turned back; nothing is undone twice.
        events = list(SagaEvent.objects.filter(saga=saga).order_by("id"))
        turned = next((e.id for e in events if e.kind in BACKWARD_EVENTS), None)
        if turned is not None:
            late = [
                e
                for e in events
                if e.id > turned and e.kind == EventKind.STEP_COMPLETED and e.step_name != "ch"
            ]
            assert not late, f"{saga.name} {order}: completed after it turned back: {late}"
        undone = Counter(
            (e.step_name, e.detail.get("member"))
            for e in events
            if e.kind == EventKind.STEP_COMPENSATED
        )
        assert all(n == 1 for n in undone.values()), f"undone twice: {undone}"
        if final:
            assert saga.status in ("completed", "compensated"), (saga.name, order, saga.status)
            if saga.status == "completed":
                assert all(status == "completed" for _, status, _ in rows), rows
            else:
                assert all(status not in IN_PLACE for _, status, _ in rows), rows
                assert all(stock[f"{order}:{name}"] == STOCK for name, _, _ in rows)
            if saga.parent_id is None and saga.status == "compensated":
                children = Saga.objects.filter(parent=saga).values_list("status", flat=True)
                assert set(children) <= {"compensated"}, set(children)


def drive_to_the_end(machine: ShapesMachine, rounds: int = 60) -> None:
    """The faults stopped: deliver everything, sweep, and act as an operator on what stopped."""
    for _ in range(rounds):
        for _ in range(500):  # a message whose outcome is "retry" stays: every one in turn
            if not (BROKER.chains or BROKER.callbacks or BROKER.ended):
                break
            for chain in list(BROKER.chains):
                if chain in BROKER.chains:
                    deliver(chain)
            while BROKER.callbacks:
                run_callback(BROKER.callbacks.pop(0))
            while BROKER.ended:
                child_ended(*BROKER.ended.pop(0))
        sagas = Saga.objects.exclude(status__in=("completed", "compensated"))
        if not sagas.exists():
            return
        for saga in sagas.filter(status="failed").order_by("-parent_id"):  # children first
            with contextlib.suppress(InvalidTransition, SagaBusy):
                services.saga_retry(saga_id=saga.pk, actor="ops")
        sweep(list(Saga.objects.values_list("pk", flat=True)))
    stuck = Saga.objects.exclude(status__in=("completed", "compensated"))
    raise AssertionError(f"not final: {list(stuck.values_list('name', 'status', 'error_code'))}")


EXAMPLES = int(os.environ.get("SAGAS_SHAPES_EXAMPLES", "40"))


def head_member_chain(position: int) -> int:
    """The index in the broker of the message of the group's member at `position`."""
    return next(i for i, chain in enumerate(BROKER.chains) if chain.entries[0][1] == position)


def check_child_compensated_by_its_parent() -> None:
    parent = Saga.objects.get(parent__isnull=True)
    child = Saga.objects.get(parent=parent)
    assert (parent.status, child.status) == ("compensated", "compensated")
    kinds = list(child.events.order_by("id").values_list("kind", flat=True))
    assert kinds.index(EventKind.SAGA_COMPLETED) < kinds.index(EventKind.COMPENSATION_STARTED)
    STATS["child compensated by its parent"] += 1


def run_until(machine: ShapesMachine, done: Any, limit: int = 50) -> None:
    """Deliver the first message, again and again, until `done()` or nothing is left."""
    for _ in range(limit):
        if done() or not BROKER.chains:
            return
        machine.deliver(0, "once")
        machine.effects_match_the_rows()


def run_everything_until(machine: ShapesMachine, done: Any, limit: int = 500) -> None:
    """Deliver every message in turn (one whose outcome is a retry stays), the error
    callbacks and the children's ends, until `done()` or nothing is left."""
    for _ in range(limit):
        if not (BROKER.chains or BROKER.callbacks or BROKER.ended):
            return
        for chain in list(BROKER.chains):
            if done():
                return
            if chain in BROKER.chains:
                deliver(chain)
                machine.effects_match_the_rows()
        while BROKER.callbacks and not done():
            run_callback(BROKER.callbacks.pop(0))
        while BROKER.ended and not done():
            child_ended(*BROKER.ended.pop(0))
        if done():
            return


# Fixed examples, run first: each path the random ones might miss, with the invariants after
# each rule and at the end.
SCRIPTS = {
    "a member fails for good while another is in flight": lambda m: (
        m.start([("m1", "business")]),
        run_until(m, lambda: SagaMember.objects.exists()),
        m.deliver(head_member_chain(1), "once"),  # m1 fails: the saga turns back
        m.deliver(head_member_chain(0), "once"),  # m0's message comes after: it does not run
    ),
    "a worker killed after a member's effect": lambda m: (
        m.start([]),
        run_until(m, lambda: SagaMember.objects.exists()),
        m.deliver(head_member_chain(0), "killed"),
        m.deliver(head_member_chain(0), "once"),  # redelivered: counted, then run
    ),
    "the parent compensates its completed child": lambda m: (
        m.start([("s_last", "business")]),
        drive_to_the_end(m),
        check_child_compensated_by_its_parent(),
    ),
    "the parent compensates its group's completed child member": lambda m: (
        m.start([("s_last", "business")], "sf_parent_member_child"),
        drive_to_the_end(m),
        check_child_compensated_by_its_parent(),
    ),
    "a member fails for good while the child member's child is in flight": lambda m: (
        m.start([("m1", "business")], "sf_parent_member_child"),
        run_until(m, lambda: Saga.objects.filter(parent__isnull=False).exists()),
        m.deliver(head_member_chain(1), "once"),  # m1 fails: the child in flight is aborted
        drive_to_the_end(m),
    ),
    "members compensated at the same time, one killed after its undo": lambda m: (
        m.start([("s_last", "business")], "sf_parent_together"),
        run_everything_until(m, lambda: len(member_compensation_chains()) > 1),
        m.deliver(member_compensation_chains()[-1], "killed"),
        m.deliver(member_compensation_chains()[0], "once"),
        drive_to_the_end(m),
    ),
}


def member_compensation_chains() -> list[int]:
    """The broker's positions of the messages of the members' compensations."""
    return [
        i
        for i, chain in enumerate(BROKER.chains)
        if chain.kind == COMPENSATION and chain.entries[0][1] is not None
    ]


@pytest.fixture
def broker(monkeypatch) -> Broker:
    monkeypatch.setattr("sagas.engine.dispatch.send_steps", BROKER.send_steps)
    monkeypatch.setattr("sagas.engine.dispatch.send_members", BROKER.send_members)
    monkeypatch.setattr("sagas.engine.dispatch.send_compensations", BROKER.send_compensations)
    monkeypatch.setattr(
        "sagas.engine.dispatch.send_member_compensations", BROKER.send_member_compensations
    )
    monkeypatch.setattr("sagas.engine.dispatch.send_child_ended", BROKER.send_child_ended)
    return BROKER


def test_groups_and_children_under_every_order_of_messages(transactional_db, broker):
    STATS.clear()
    run = settings(
        max_examples=EXAMPLES,
        stateful_step_count=50,
        deadline=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    ShapesMachine.TestCase.settings = run
    from hypothesis.stateful import run_state_machine_as_test

    for name, script in SCRIPTS.items():
        machine = ShapesMachine()
        script(machine)
        machine.effects_match_the_rows()
        machine.teardown()
        STATS[("script", name)] += 1
    run_state_machine_as_test(ShapesMachine, settings=run)
    print(dict(STATS))
    for seen in [
        (STEP, "done", True),
        (STEP, "fail", True),
        (COMPENSATION, "done", True),
        "killed",
        "child ended",
        "child member ended",
        "child compensated by its parent",
        ("operator", "compensate"),
    ]:
        assert STATS[seen], f"no {seen} in {dict(STATS)}"
