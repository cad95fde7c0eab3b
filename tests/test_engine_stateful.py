"""A Hypothesis stateful test of the engine: the same invariants hold after every rule.

The state machine drives the real engine in-process, against the real PostgreSQL test
database, with the order fulfilment saga and its real domain services and payment gateway.
No Celery message is sent: `sagas.engine.dispatch.send_steps` and `send_compensations` are replaced
by functions that append chains to an in-memory list, and that list *is* the model of the
broker, with the chains' error callbacks as messages of their own.

Rules deliver the head message of a chain the way `sagas.tasks` does (`tasks.attempt`, then
what the task does with the outcome), deliver a message twice, lose messages, lose, repeat
and delay error callbacks, kill a worker mid-step after its external call (the step's
transaction rolls back and the message comes back), stop an attempt at its hard time limit
(the message is acknowledged and Celery sends the error callback twice), crash the broker and
run the sweeper, recover the same sagas many times in a row, pass deadlines, inject failures,
and act as an operator. After every rule the invariants are checked against the rows; at the
end of an example the faults stop, everything is driven to a final state and checked again.

A lost message loses the rest of its chain too: in Celery the remaining signatures of a chain
travel inside the message that is running.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

import pytest
from django.db import OperationalError, connection
from django.test import Client
from django.utils import timezone
from django.utils.module_loading import import_string
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from inventory.models import Product, Reservation, ReservationStatus
from orders.models import Order, OrderLine
from orders.sagas import ORDER_FULFILMENT
from orders.services import order_submit
from payments.gateway import gateway_outage_begin, gateway_recover
from payments.models import GatewayAttempt, GatewayCharge, GatewayOutage, Payment
from sagas import engine, tasks
from sagas.definitions import StepContext, Wait, is_wait, snapshot_version
from sagas.engine import sweeper, waker
from sagas.engine.relay import relay
from sagas.exceptions import InvalidTransition
from sagas.models import (
    EventKind,
    Saga,
    SagaEvent,
    SagaMember,
    SagaNotice,
    SagaSignal,
    SagaStatus,
    SagaStep,
    StepStatus,
    stage_definition,
)
from sagas.services import saga_compensate, saga_retry, saga_signal, saga_step_resolve
from sagas.signals import BY_KIND
from sagas.testing import faults
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from shipping.models import Shipment, ShipmentStatus
from tests.conftest import ADDRESS

pytestmark = pytest.mark.django_db(transaction=True, databases=["default", "gateway"])

S, T = SagaStatus, StepStatus
# Every stage of the order saga, by index (its rows'), and its steps (what faults hit).
STAGE_NAMES = [stage.name for stage in ORDER_FULFILMENT.steps]
STEP_NAMES = [stage.name for stage in ORDER_FULFILMENT.steps if not isinstance(stage, Wait)]
INDEX = {name: index for index, name in enumerate(STAGE_NAMES)}
# The wait for a 3-D Secure card's confirmation (tok_3ds*; other cards skip it).
CONFIRMATION = INDEX["payment_confirmation"]
A_CONFIRMATION = {"type": "payment.confirmed", "charge_id": "ch_by_hand"}
TOKENS = [
    "tok_ok",
    "tok_declined",
    "tok_transient_2",
    "tok_timeout",
    "tok_lost_response",
    "tok_3ds",
    "tok_3ds_abandoned",
]
COUNTRIES = ["GB", "AQ"]
SKU, PRICE, INITIAL_STOCK = "STATEFUL-LTD", Decimal("10.00"), 3
MAX_SAGAS = 4
MAX_RECOVERIES = 3
FINAL = {S.COMPLETED, S.COMPENSATED}
IN_FLIGHT = {S.PENDING, S.RUNNING, S.WAITING, S.COMPENSATING}
# Step statuses whose domain effect is in place, for a step that completed.
EFFECT_IN_PLACE = {T.COMPLETED, T.COMPENSATING, T.COMPENSATION_FAILED}
COMPENSATION_STATES = {T.COMPENSATING, T.COMPENSATED, T.COMPENSATION_FAILED}
# Error codes a step may be retried for; any other failure is a business one.
# (worker_lost, connection_lost: an attempt counted as lost; statement_timeout: its own query.)
TRANSIENT_CODES = {
    "gateway_unavailable",
    "injected_transient_error",
    "time_limit",
    "worker_lost",
    "connection_lost",
    "statement_timeout",
}
# Events by which a saga begins compensating.
BEGINS_COMPENSATION = {
    EventKind.COMPENSATION_STARTED,
    EventKind.OPERATOR_COMPENSATE,
    EventKind.DEADLINE_PASSED,
}
# Events that are progress (or an operator taking over): the count of stalls starts again.
PROGRESS = {
    EventKind.STEP_COMPLETED,
    EventKind.STEP_COMPENSATED,
    EventKind.WAIT_COMPLETED,
    EventKind.WAIT_SKIPPED,
    EventKind.OPERATOR_RETRY,
    EventKind.OPERATOR_COMPENSATE,
    EventKind.OPERATOR_RESOLVE,
}
# The tables one example writes; emptied before each example.
RESET_MODELS = [
    SagaMember,
    SagaNotice,
    SagaSignal,
    SagaEvent,
    SagaStep,
    Fault,
    Payment,
    OrderLine,
    Order,
    Saga,
    Reservation,
    Product,
    Shipment,
    GatewayAttempt,
    GatewayCharge,
    GatewayOutage,
]

STEP, COMPENSATION = "step", "compensation"
CHARGE = INDEX["charge_payment"]  # the step whose action calls outside (the gateway)
STATS: Counter[Any] = Counter()


class WorkerDied(BaseException):
    """The worker process died here: the attempt's transaction never commits."""


@dataclass
class Dies:
    """An injector that kills the worker at one point of an attempt."""

    point: str

    def before_action(self) -> None:
        pass

    def after_action(self) -> None:  # after the external call, before the commit
        raise WorkerDied

    def before_compensation(self) -> None:
        raise WorkerDied


@dataclass
class OwnStatementTimesOut:
    """The action's (or compensation's) own query outlives its statement timeout (57014)."""

    def before_action(self) -> None:
        pass

    def after_action(self) -> None:
        faults.statement_times_out()

    before_compensation = after_action


@dataclass
class CommitAnswerLost:
    """The attempt's next COMMIT (its own, or its failure's) commits unheard."""

    def before_action(self) -> None:
        faults.lose_next_commit_answer()

    def after_action(self) -> None:
        pass

    before_compensation = before_action


# -- the broker ------------------------------------------------------------------------------


@dataclass
class Chain:
    """A Celery chain in flight: its pending messages (step indexes), head first."""

    kind: str  # STEP or COMPENSATION
    saga_id: str
    epoch: int
    indexes: list[int]
    # The head message comes back after its worker died (the broker's redelivered flag), or
    # after a delivery that lost its database connection (when that one began).
    redelivered: bool = False
    unsure_since: float = 0.0

    def __repr__(self) -> str:
        return f"<{self.kind} {self.saga_id[:8]}@{self.epoch} {self.indexes}>"


# The exceptions that fail a task and so send its chain's error callback (`sagas.chain_failed`).
STEP_FAILED = "sagas.tasks.StepFailed"
TIME_LIMIT = "billiard.exceptions.TimeLimitExceeded"
REFUSED = "kombu.exceptions.OperationalError"


@dataclass(frozen=True)
class Callback:
    """A chain's error callback, travelling as a message of its own."""

    kind: str
    saga_id: str
    epoch: int
    failed: int | None = None  # the failed task's step, as its task id tells
    cause: str = STEP_FAILED  # the class of the exception that failed the task


@dataclass
class Broker:
    """What the engine sent and nobody has run yet."""

    chains: list[Chain] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    # The simulated gateway's confirmation webhooks (tok_3ds), not yet posted: (url, payload).
    webhooks: list[tuple[str, dict]] = field(default_factory=list)

    def post_later(self, args: tuple[str, dict], countdown: float = 0.0) -> None:
        self.webhooks.append(args)

    def send_steps(self, saga_id: str, epoch: int, steps: list, countdown: float) -> None:
        self.chains.append(Chain(STEP, saga_id, epoch, [index for index, _ in steps]))

    def send_compensations(self, saga_id: str, epoch: int, steps: list, countdown: float) -> None:
        self.chains.append(Chain(COMPENSATION, saga_id, epoch, [entry[0] for entry in steps]))

    def pick(self, i: int) -> Chain:
        return self.chains[i % len(self.chains)]

    def end(
        self,
        chain: Chain,
        *,
        callbacks: int = 0,
        failed: int | None = None,
        cause: str = STEP_FAILED,
    ) -> None:
        self.chains.remove(chain)
        callback = Callback(chain.kind, chain.saga_id, chain.epoch, failed, cause)
        self.callbacks += [callback] * callbacks

    def clear(self) -> None:
        self.chains.clear()
        self.callbacks.clear()
        self.webhooks.clear()


def deliver(broker: Broker, chain: Chain, fault: Any = None) -> engine.Outcome:
    """Run the head message of `chain` as `sagas.tasks` does, and act on the outcome.

    done/duplicate: the chain goes on; stop: it ends; retry: the same message stays at the head;
    fail: the chain ends and its error callback is sent.
    """
    forward = chain.kind == STEP
    index = chain.indexes[0]
    # As `sagas.tasks` does first for such a delivery: tell what a lost answer committed, and
    # count an attempt that died.
    failed = None
    if chain.unsure_since or chain.redelivered:
        failed = engine.after_unsure_commit(
            chain.saga_id, index, forward=forward, since=chain.unsure_since or None
        )
        chain.unsure_since = 0.0
    counted = None
    if chain.redelivered:
        chain.redelivered = False
        counted = engine.attempt_lost(chain.saga_id, index, forward=forward, why="redelivered")
        STATS["attempt counted as lost"] += counted is not None
    if counted is not None:
        outcome = counted
    else:
        if fault is None:
            fault = faults.take(chain.saga_id, index, forward=forward)
        outcome = tasks.attempt(chain.saga_id, index, chain.epoch, forward=forward, fault=fault)
    if outcome.kind == "stop" and failed is not None:
        outcome = engine.Outcome("fail", error=failed)
        STATS["failure told again after a lost answer"] += 1
    if outcome.kind == "fail":
        broker.end(chain, callbacks=1, failed=index)
    elif outcome.kind == "stop":
        broker.end(chain)
    elif outcome.kind in ("done", "duplicate"):
        chain.indexes.pop(0)
        if not chain.indexes:
            broker.end(chain)
    else:
        assert outcome.kind == "retry", outcome
        if not forward and expire_fence(chain.saga_id, index):
            STATS["compensation waited for a fence"] += 1
    STATS[(chain.kind, outcome.kind)] += 1
    return outcome


def expire_fence(saga_id: Any, index: int) -> bool:
    """The compensation waits for an attempt of its step that may still run (the step row's
    `fenced_until`): here no attempt runs behind the model's back, so time passes at once."""
    passed = timezone.now() - timedelta(seconds=1)
    fenced = SagaStep.objects.filter(saga_id=saga_id, index=index, fenced_until__gt=passed)
    return bool(fenced.update(fenced_until=passed))


def resolve_checking_the_context(path: str) -> Any:
    """Every action and compensation sees the outputs of all the steps before it."""
    target = import_string(path)

    def checked(ctx: StepContext) -> Any:
        if ctx.step:  # not the saga's on_complete
            earlier = STAGE_NAMES[: INDEX[ctx.step]]
            assert sorted(ctx.outputs) == sorted(earlier), f"{ctx.step} got {ctx.outputs}"
        return target(ctx)

    return checked


def post_webhook(url: str, payload: dict) -> int:
    """POST a confirmation to a signed URL, as the gateway does; its answer's status."""
    answer = Client().post(urlsplit(url).path, payload, content_type="application/json")
    assert answer.status_code in (200, 202, 409), (answer.status_code, answer.content)
    return answer.status_code


def expire_waits(saga_ids: list[str]) -> list[str]:
    """The waiting sagas' timeouts pass now, and the wake ends them."""
    passed = timezone.now() - timedelta(seconds=1)
    waiting = SagaStep.objects.filter(saga_id__in=saga_ids, status=T.WAITING)
    if not waiting.update(due_at=passed):
        return []
    return waker.time_out_due()


def run_callback(callback: Callback) -> None:
    handle = engine.step_chain_failed if callback.kind == STEP else engine.compensation_chain_failed
    handle(callback.saga_id, callback.epoch, failed=callback.failed, cause=callback.cause)
    STATS[("callback", callback.kind)] += 1


# -- reading the rows ------------------------------------------------------------------------


def snapshot() -> dict[str, list[tuple[Any, ...]]]:
    """Everything an engine call may change (but not timestamps, nor the fault counters)."""
    return {
        "sagas": list(
            Saga.objects.order_by("pk").values_list(
                "pk",
                "status",
                "direction",
                "epoch",
                "current_step",
                "error_code",
                "error_message",
                "recovery_attempts",
            )
        ),
        "steps": list(
            SagaStep.objects.order_by("saga_id", "index").values_list(
                "saga_id",
                "index",
                "status",
                "attempts",
                "compensation_attempts",
                "output",
                "error_code",
                "error_message",
            )
        ),
        "events": list(
            SagaEvent.objects.exclude(kind=EventKind.DUPLICATE_IGNORED)
            .order_by("pk")
            .values_list("pk", "kind", "step_index")
        ),
        "orders": list(Order.objects.order_by("pk").values_list("pk", "status")),
        "payments": list(Payment.objects.order_by("pk").values_list("pk", "status")),
        "charges": list(GatewayCharge.objects.order_by("pk").values_list("pk", "status")),
        "products": list(Product.objects.order_by("pk").values_list("pk", "stock_on_hand")),
        "reservations": list(Reservation.objects.order_by("pk").values_list("pk", "status")),
        "shipments": list(Shipment.objects.order_by("pk").values_list("pk", "status")),
    }


def age_in_flight_sagas(order: list[str]) -> None:
    """Make every saga in flight look stalled to the sweeper, the first started the oldest
    (so that the sweeper takes them in the same order in every run of an example)."""
    now = timezone.now()
    for i, saga_id in enumerate(order):
        Saga.objects.filter(pk=saga_id, status__in=IN_FLIGHT).update(
            updated_at=now - timedelta(seconds=30 - i / 1000)
        )


def sweep_stalled(order: list[str]) -> sweeper.SweepReport:
    """The time the sweeper waits for passes: the sagas in flight look stalled, and a
    compensation's fence (an attempt of its step that may still run) has expired."""
    age_in_flight_sagas(order)
    passed = timezone.now() - timedelta(seconds=1)
    SagaStep.objects.filter(saga_id__in=order, fenced_until__gt=passed).update(fenced_until=passed)
    return sweeper.sweep(stale_after=timedelta(seconds=1), max_recoveries=MAX_RECOVERIES)


def fix_by_hand(saga_id: str, index: int) -> None:
    """What an operator does before `resolve`: undo the step through the domain services."""
    step = SagaStep.objects.select_related("saga").get(saga_id=saga_id, index=index)
    ctx = StepContext(
        saga_id=step.saga.pk,
        step=step.name,
        input=step.saga.input,
        outputs={},
        attempt=1,
        output=step.output,
    )
    import_string(step.definition["compensation"])(ctx)


def reset_database() -> None:
    tables = ", ".join(connection.ops.quote_name(m._meta.db_table) for m in RESET_MODELS)
    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {tables} RESTART IDENTITY")


# -- the machine -----------------------------------------------------------------------------


class EngineMachine(RuleBasedStateMachine):
    broker: Broker  # set by the test, shared with the patched dispatch functions

    def __init__(self) -> None:
        super().__init__()
        self.broker.clear()
        reset_database()
        HEARD.clear()
        gateway_recover()
        self.product = Product.objects.create(
            sku=SKU, name="Limited print", price=PRICE, stock_on_hand=INITIAL_STOCK
        )
        self.sagas: list[str] = []

    def saga(self, i: int) -> str:
        return self.sagas[i % len(self.sagas)]

    # -- rules: clients and faults -----------------------------------------------------------
    # Few rules, each broad: Hypothesis draws rules uniformly, so the interleavings that matter
    # (a fault, then an operator or the sweeper acting before the broker catches up) come up
    # more often than with one rule per variant.

    @initialize(
        tokens=st.lists(st.sampled_from(TOKENS), min_size=1, max_size=2),
        trouble=st.sampled_from(["and its compensation fails", "a business failure", "none"]),
        at=st.integers(1, len(STEP_NAMES) - 1),
    )
    def begin(self, tokens: list[str], trouble: str, at: int) -> None:
        """Every example starts with sagas in flight and, most often, trouble planted: a step
        that fails for good, and maybe the compensation of the step before it failing too
        (what an operator then retries or resolves)."""
        if trouble != "none":
            self.faults("business error", STEP_NAMES[at], saga=None, remaining=None)
        if trouble == "and its compensation fails":
            self.faults("failing compensation", STEP_NAMES[at - 1], saga=None, remaining=None)
        for token in tokens:
            self.start_saga(token, "GB", 1)

    @precondition(lambda self: len(self.sagas) < MAX_SAGAS)
    @rule(
        token=st.sampled_from(TOKENS),
        country=st.sampled_from(COUNTRIES),
        quantity=st.integers(1, 2),
    )
    def start_saga(self, token: str, country: str, quantity: int) -> None:
        saga, created = order_submit(
            customer=None,
            items=[{"sku": SKU, "quantity": quantity}],
            shipping_address={**ADDRESS, "country": country},
            payment_token=token,
        )
        assert created
        self.sagas.append(str(saga.pk))
        # Compensations give up after 2 attempts, not 6, so that examples reach that too: a
        # definition of its own, under a version of its own (workers cache them by version).
        # Every row gets a copy of its own: its saga's new version is not stored.
        steps = list(SagaStep.objects.filter(saga=saga).order_by("index"))
        for step in steps:
            definition = step.definition
            if not is_wait(definition):
                definition["compensation_retry"]["max_attempts"] = 2
            step.definition = definition
            step.save(update_fields=["stored_definition"])
        version = snapshot_version([step.definition for step in steps])
        Saga.objects.filter(pk=saga.pk).update(definition_version=version)

    @rule(
        kind=st.sampled_from(
            ["trouble for a saga", "business error", "failing compensation", "none"]
        ),
        step=st.sampled_from(STEP_NAMES),
        saga=st.none() | st.integers(0, MAX_SAGAS - 1),
        remaining=st.none() | st.integers(1, 3),
    )
    def faults(self, kind: str, step: str, saga: int | None, remaining: int | None) -> None:
        """A step's action starts failing (for good), or its compensation (transiently), or
        both for one saga in flight (its step in progress, and the compensation of the step
        before it), or the faults are fixed."""
        if kind == "none":
            Fault.objects.all().delete()
            return
        if kind == "trouble for a saga":
            target = self.saga(saga or 0) if self.sagas else None
            current = SagaStep.objects.filter(saga_id=target, status__in=[T.PENDING, T.RUNNING])
            index = current.order_by("index").values_list("index", flat=True).first()
            if target is None or not index:
                return
            for point, effect, name in (
                (FaultPoint.BEFORE_ACTION, FaultEffect.BUSINESS_ERROR, STAGE_NAMES[index]),
                (
                    FaultPoint.BEFORE_COMPENSATION,
                    FaultEffect.TRANSIENT_ERROR,
                    STAGE_NAMES[index - 1],
                ),
            ):
                Fault.objects.create(saga_id=target, step_name=name, point=point, effect=effect)
            return
        business = kind == "business error"
        Fault.objects.create(
            saga_id=self.saga(saga) if saga is not None and self.sagas else None,
            step_name=step,
            point=FaultPoint.BEFORE_ACTION if business else FaultPoint.BEFORE_COMPENSATION,
            effect=FaultEffect.BUSINESS_ERROR if business else FaultEffect.TRANSIENT_ERROR,
            remaining=remaining,
        )

    @rule(outage=st.booleans())
    def gateway(self, outage: bool) -> None:
        """The payment gateway goes down for `tok_timeout` (charges fail transiently), or back."""
        if outage:
            gateway_outage_begin()
        else:
            gateway_recover()

    # -- rules: the broker and the workers ---------------------------------------------------

    @precondition(lambda self: self.broker.chains)
    @rule(picks=st.lists(st.integers(0, 7), min_size=1, max_size=8))
    def deliver(self, picks: list[int]) -> None:
        for i in picks:
            if not self.broker.chains:
                return
            deliver(self.broker, self.broker.pick(i))

    @precondition(lambda self: self.broker.chains)
    @rule(i=st.integers(0, 7))
    def deliver_twice(self, i: int) -> None:
        """A message delivered, then redelivered (with the rest of its chain): no new effect."""
        chain = self.broker.pick(i)
        copy = Chain(chain.kind, chain.saga_id, chain.epoch, list(chain.indexes))
        first = deliver(self.broker, chain)
        self.broker.chains.append(copy)
        before = snapshot()
        second = deliver(self.broker, copy)
        if first.kind in ("done", "duplicate"):  # (a message of an older chain just stops)
            assert second.kind in ("duplicate", "stop"), (first, second)
        if first.kind == "stop":
            assert second.kind == "stop", (first, second)
        if first.kind in ("done", "duplicate", "stop"):
            assert snapshot() == before, "a duplicate delivery changed the rows"

    @precondition(lambda self: self.broker.chains)
    @rule(
        i=st.integers(0, 7),
        fate=st.sampled_from(
            [
                "killed",
                "killed, then aborted",
                "hard time limit",
                "lost",
                "next message refused",
                "own statement times out",
                "commit answer lost",
            ]
        ),
    )
    def worker_fault(self, i: int, fate: str) -> None:
        """killed: SIGKILL after the step's external call, before its commit: the transaction
        rolls back and the message comes back (`task_reject_on_worker_lost`); "then aborted":
        an operator compensates the saga before it does.
        hard time limit: the attempt hangs and is killed before its commit; Celery acknowledges
        the message and sends the chain's error callback, twice.
        lost: the message (with the rest of its chain) is lost, as in a broker crash.
        next message refused: the attempt commits, then the broker refuses the chain's next
        message; Celery fails the task and sends the chain's error callback.
        own statement times out: the attempt's own query fails (SQLSTATE 57014): a counted,
        transient failure.
        commit answer lost: the attempt's COMMIT (or its failure's) commits, and the worker
        hears an error: the message is sent again, and its next delivery tells what the lost
        one committed.
        An operator's abort right after a death matters where the step made an external call:
        that fate picks a chain about to charge, when there is one."""
        chain = self.broker.pick(i)
        charging = [c for c in self.broker.chains if c.kind == STEP and c.indexes[0] == CHARGE]
        if fate == "killed, then aborted" and charging:
            chain = charging[i % len(charging)]
        if fate == "lost":
            self.broker.chains.remove(chain)
            return
        head = chain.indexes[0]
        if fate == "own statement times out":
            deliver(self.broker, chain, fault=OwnStatementTimesOut())
            STATS[fate] += 1
            return
        if fate == "commit answer lost":
            began = time.time()
            try:
                deliver(self.broker, chain, fault=CommitAnswerLost())
            except OperationalError:
                STATS[fate] += 1
                chain.unsure_since = began
            faults.restore_commit()  # the injected loss, if the attempt never committed
            return
        if fate == "next message refused":
            outcome = deliver(self.broker, chain)
            if outcome.kind in ("done", "duplicate") and chain in self.broker.chains:
                STATS[fate] += 1
                self.broker.end(chain, callbacks=1, failed=head, cause=REFUSED)
            return
        with suppress(WorkerDied):
            deliver(self.broker, chain, fault=Dies(fate))
            return  # it finished (or stopped) before the fault
        STATS["killed" if fate.startswith("killed") else fate] += 1
        chain.redelivered = fate.startswith("killed")  # `task_reject_on_worker_lost`
        if fate == "hard time limit":
            self.broker.end(chain, callbacks=2, failed=head, cause=TIME_LIMIT)
        if fate == "killed, then aborted":
            with suppress(InvalidTransition):
                saga_compensate(saga_id=chain.saga_id, actor="operator")

    @precondition(lambda self: self.broker.callbacks)
    @rule(i=st.integers(0, 7), fate=st.sampled_from(["delivered", "repeated", "lost"]))
    def error_callback(self, i: int, fate: str) -> None:
        """Any queued error callback, not only the oldest (a late one arrives out of order):
        delivered, delivered and left queued to come again, or lost."""
        callback = self.broker.callbacks[i % len(self.broker.callbacks)]
        if fate != "repeated":
            self.broker.callbacks.remove(callback)
        if fate == "lost":
            STATS["callback lost"] += 1
            return
        run_callback(callback)
        if fate == "repeated":
            before = snapshot()
            run_callback(callback)
            assert snapshot() == before, "a repeated error callback changed the rows"

    @rule(times=st.integers(0, MAX_RECOVERIES + 2))
    def sweeper(self, times: int) -> None:
        """Redis restarts empty (times=0: every message is lost, then one sweep), or the sweeper
        takes sagas whose messages are still in flight for stalled ones, maybe several times in
        a row (past its limit, it fails them for an operator)."""
        if times == 0:
            self.broker.clear()
        for _ in range(max(times, 1)):
            sweep_stalled(self.sagas)

    @precondition(lambda self: self.sagas)
    @rule(i=st.integers(0, MAX_SAGAS - 1))
    def deadline_passes(self, i: int) -> None:
        Saga.objects.filter(pk=self.saga(i)).update(deadline_at=timezone.now())
        sweeper.sweep(stale_after=timedelta(days=1))

    # -- rules: waits and signals -----------------------------------------------------------

    @precondition(lambda self: self.broker.webhooks)
    @rule(i=st.integers(0, 7), fate=st.sampled_from(["posted", "posted twice", "lost"]))
    def webhook(self, i: int, fate: str) -> None:
        """The gateway posts a 3-D Secure confirmation to the saga's signed URL (through the
        view, as a provider does): once, twice (its answer was lost), or never."""
        url, payload = self.broker.webhooks.pop(i % len(self.broker.webhooks))
        if fate == "lost":
            STATS["webhook lost"] += 1
            return
        for _ in range(2 if fate == "posted twice" else 1):
            STATS[("webhook", post_webhook(url, payload))] += 1

    @precondition(lambda self: self.sagas)
    @rule(i=st.integers(0, MAX_SAGAS - 1), key=st.sampled_from(["a", "b", None]))
    def confirmation(self, i: int, key: str | None) -> None:
        """A confirmation sent at any moment (a provider's console, a retried call): kept
        before the saga reaches its wait, consumed while it waits, refused once it is over
        (answered, timed out, skipped, the saga compensating or finished); with a key used
        before, the first answer."""
        saga_id = self.saga(i)
        outcome = saga_signal(
            saga_id=saga_id,
            event="payment_confirmed",
            payload=A_CONFIRMATION,
            idempotency_key=f"{saga_id}:{key}" if key else None,
        )
        STATS[("confirmation", str(outcome.status))] += 1

    @precondition(lambda self: self.sagas)
    @rule(i=st.integers(0, MAX_SAGAS - 1))
    def confirmation_times_out(self, i: int) -> None:
        """The wait's due time passes, and the wake ends it (the saga compensates)."""
        STATS["wait timed out"] += len(expire_waits([self.saga(i)]))

    # -- rules: the operator -----------------------------------------------------------------

    @precondition(lambda self: self.sagas)
    @rule(
        i=st.integers(0, MAX_SAGAS - 1),
        action=st.sampled_from(["retry", "compensate", "resolve"]),
        index=st.integers(0, len(STAGE_NAMES) - 1),
    )
    def operator(self, i: int, action: str, index: int) -> None:
        """An operator retries or resolves a failed saga (as one does, from the failed list),
        or compensates any saga."""
        failed = Saga.objects.filter(pk__in=self.sagas, status=S.FAILED)
        if action == "resolve":
            failed = failed.filter(steps__status=T.COMPENSATION_FAILED)
        chosen = {str(pk) for pk in failed.values_list("pk", flat=True)}
        candidates = [saga_id for saga_id in self.sagas if saga_id in chosen]  # in a set order
        if action == "compensate" or not candidates:
            candidates = self.sagas
        saga_id = candidates[i % len(candidates)]
        undone = SagaStep.objects.filter(saga_id=saga_id, status=T.COMPENSATION_FAILED)
        if action == "resolve" and (indexes := list(undone.values_list("index", flat=True))):
            index = indexes[index % len(indexes)]
        if action == "resolve" and engine.plan(saga_id, "resolve", index).allowed:
            fix_by_hand(saga_id, index)  # what an operator does before `resolve`
        with suppress(InvalidTransition):
            if action == "retry":
                saga_retry(saga_id=saga_id, actor="operator")
            elif action == "compensate":
                saga_compensate(saga_id=saga_id, actor="operator")
            else:
                saga_step_resolve(saga_id=saga_id, index=index, actor="operator")
            STATS[("operator", action)] += 1

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def invariants_hold(self) -> None:
        check_invariants()

    # -- the end of an example: the faults stop, everything must become final ---------------

    def teardown(self) -> None:
        STATS["examples"] += 1
        if sys.exc_info()[0] is not None:  # a rule or an invariant failed: keep that error
            self.broker.clear()
            return
        try:
            self.drain()
            check_invariants(final=True)
            check_signals_sent()
        finally:
            self.broker.clear()

    def drain(self) -> None:
        """Deliver everything, recover what is stalled, and retry failed sagas as an operator."""
        Fault.objects.all().delete()
        gateway_recover()
        statuses: dict[Any, str] = {}
        for _round in range(20):
            while self.broker.webhooks:
                post_webhook(*self.broker.webhooks.pop(0))
            deliveries = 0
            while self.broker.chains or self.broker.callbacks:
                if self.broker.chains:
                    deliver(self.broker, self.broker.chains[0])
                else:
                    run_callback(self.broker.callbacks.pop(0))
                deliveries += 1
                assert deliveries < 500, f"the broker does not drain: {self.broker}"
            check_invariants()
            statuses = dict(Saga.objects.values_list("pk", "status"))
            if any(status in IN_FLIGHT for status in statuses.values()):
                expire_waits(self.sagas)  # no confirmation comes any more: they time out
                sweep_stalled(self.sagas)
                continue
            failed = [i for i in self.sagas if statuses[UUID(i)] == S.FAILED]
            if not failed:
                return
            for saga_id in failed:
                saga_retry(saga_id=saga_id, actor="operator")
        raise AssertionError(f"sagas did not reach a final state: {statuses}")


# The ids of the events whose signals were sent (see `check_signals_sent`).
HEARD: set[int] = set()


def _hear(sender: Any, event_id: int, **kwargs: Any) -> None:
    HEARD.add(event_id)


@pytest.fixture
def hearing() -> Any:
    """A receiver of every signal while the machine runs."""
    for signal in BY_KIND.values():
        signal.connect(_hear, dispatch_uid="tests.test_engine_stateful.hear")
    yield
    for signal in BY_KIND.values():
        signal.disconnect(_hear, dispatch_uid="tests.test_engine_stateful.hear")


def check_signals_sent() -> None:
    """Every committed transition's signals were sent at least once, once the relay has sent
    what no process did; none of them twice but where a process died or lost its answer."""
    relay(older_than=timedelta(0))
    signalled = set(SagaEvent.objects.filter(kind__in=BY_KIND).values_list("pk", flat=True))
    unheard = signalled - HEARD
    assert not unheard, f"events never announced: {sorted(unheard)}"
    assert not SagaNotice.objects.exists()


def check_invariants(*, final: bool = False) -> None:
    sagas = {
        str(s["pk"]): s
        for s in Saga.objects.values("pk", "status", "direction", "error_code", "input")
    }
    steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for step in SagaStep.objects.order_by("saga_id", "index").values(
        "saga_id",
        "index",
        "name",
        "status",
        "attempts",
        "compensation_attempts",
        definition=stage_definition(),
    ):
        steps[str(step["saga_id"])].append(step)
    events: dict[str, list[tuple[str, int | None, dict]]] = defaultdict(list)
    for saga_id, kind, index, detail in (
        SagaEvent.objects.exclude(kind=EventKind.DUPLICATE_IGNORED)
        .order_by("pk")
        .values_list("saga_id", "kind", "step_index", "detail")
    ):
        events[str(saga_id)].append((kind, index, detail))
    open_charges: dict[str, list[Decimal]] = defaultdict(list)
    for key, status, amount in GatewayCharge.objects.values_list(
        "idempotency_key", "status", "amount"
    ):
        if status == "charged":
            open_charges[key.split(":")[0]].append(amount)
    orders = {
        str(pk): (status, total)
        for pk, status, total in Order.objects.values_list("pk", "status", "total")
    }
    payments = Counter(
        str(order_id)
        for order_id in Payment.objects.filter(status="charged").values_list("order_id", flat=True)
    )
    reserved: Counter[str] = Counter()
    reserved_by_product: Counter[int] = Counter()
    for order_id, product_id, quantity in Reservation.objects.filter(
        status=ReservationStatus.ACTIVE
    ).values_list("order_id", "product_id", "quantity"):
        reserved[str(order_id)] += 1
        reserved_by_product[product_id] += quantity
    shipped = Counter(
        str(order_id)
        for order_id in Shipment.objects.filter(status=ShipmentStatus.SCHEDULED).values_list(
            "order_id", flat=True
        )
    )

    # Stock: nothing is lost or made up, and it never goes negative.
    for product_id, stock in Product.objects.values_list("pk", "stock_on_hand"):
        assert stock >= 0
        assert stock + reserved_by_product[product_id] == INITIAL_STOCK, (
            f"stock {stock} + reserved {reserved_by_product[product_id]} != {INITIAL_STOCK}"
        )

    for saga_id, saga in sagas.items():
        check_saga(saga_id, saga, steps[saga_id], events[saga_id], final=final)
        order_id = saga["input"]["order_id"]
        check_effects(
            saga_id,
            saga,
            steps[saga_id],
            events[saga_id],
            order=orders.get(order_id),
            charged=open_charges[saga_id],
            paid=payments[order_id],
            reserved=reserved[order_id],
            shipped=shipped[order_id],
        )

    # Money: what customers were charged and not refunded is what confirmed orders cost.
    if final:
        kept = sum((sum(amounts) for amounts in open_charges.values()), Decimal(0))
        confirmed = sum((t for status, t in orders.values() if status == "confirmed"), Decimal(0))
        assert kept == confirmed, f"charged and not refunded {kept} != confirmed {confirmed}"


def check_saga(saga_id: str, saga: dict, steps: list[dict], events: list, *, final: bool) -> None:
    status, backward = saga["status"], saga["direction"] == "backward"
    by_index = {s["index"]: s["status"] for s in steps}
    statuses = list(by_index.values())
    where = f"saga {saga_id} ({status}, {saga['direction']}, steps {statuses})"
    assert len(statuses) == len(STAGE_NAMES), where
    if final:
        assert status in FINAL, f"{where}: not final once the faults stopped"

    # Saga and step statuses agree.
    if status == S.COMPLETED:
        assert all(s == T.COMPLETED for s in statuses), where
    waits = {s["index"] for s in steps if is_wait(s["definition"])}
    if status == S.COMPENSATED:  # a wait has nothing to undo: completed or not, it stays
        undone = (T.PENDING, T.FAILED, T.COMPENSATED)
        assert all(st in undone for i, st in by_index.items() if i not in waits), where
    if status != S.WAITING:
        assert T.WAITING not in statuses, f"{where}: a stage waits, the saga does not"
    if status == S.FAILED:
        assert saga["error_code"], f"{where}: failed without a reason"
    if status == S.COMPENSATING:
        assert backward, where
    if status in (S.PENDING, S.RUNNING, S.WAITING, S.COMPLETED):
        assert not backward, where
        assert not any(s in COMPENSATION_STATES for s in statuses), where
    if status == S.PENDING:
        assert all(s == T.PENDING for s in statuses), where

    # Attempts never exceed the policy: counted from the rows, whoever ran them.
    for step in steps:
        definition = step["definition"]
        if is_wait(definition):
            continue
        assert step["attempts"] <= definition["retry"]["max_attempts"], (where, step)
        assert step["compensation_attempts"] <= definition["compensation_retry"]["max_attempts"], (
            where,
            step,
        )

    # Each step completes once, and never after the saga began compensating; compensations
    # run once each, in reverse order; a business failure is never retried nor run again.
    completed = Counter(i for kind, i, _ in events if kind == EventKind.STEP_COMPLETED)
    assert all(n == 1 for n in completed.values()), f"{where}: completed twice {completed}"
    compensated = [i for kind, i, _ in events if kind == EventKind.STEP_COMPENSATED]
    assert compensated == sorted(set(compensated), reverse=True), f"{where}: {compensated}"
    began, failed_for_good, stalls = False, set(), 0
    for kind, i, detail in events:
        if kind == EventKind.RECOVERED:
            stalls += 1
        elif kind in PROGRESS:
            stalls = 0
        elif kind == EventKind.SAGA_FAILED and detail.get("reason") == "recovery_exhausted":
            assert stalls == MAX_RECOVERIES, f"{where}: given up after {stalls} stalls in a row"
        if kind in BEGINS_COMPENSATION and detail.get("action", "compensate") == "compensate":
            began = True
            assert backward, f"{where}: compensation began, yet the saga goes forward"
        elif kind == EventKind.STEP_COMPLETED:
            assert not began, f"{where}: step {i} completed after compensation began"
            assert i not in failed_for_good, f"{where}: step {i} ran after a business failure"
        elif kind == EventKind.STEP_RETRYING:
            assert detail["code"] in TRANSIENT_CODES, f"{where}: retried {detail}"
        elif kind == EventKind.STEP_FAILED and detail["code"] not in TRANSIENT_CODES:
            failed_for_good.add(i)
    check_waits(where, waits, events)


# The events that end a wait, and those that it began (a retry may begin it again).
WAIT_ENDS = {
    EventKind.WAIT_COMPLETED,
    EventKind.WAIT_FAILED,
    EventKind.WAIT_TIMED_OUT,
    EventKind.WAIT_SKIPPED,
    EventKind.OPERATOR_SKIP,
}


def check_waits(where: str, waits: set[int], events: list) -> None:
    """Each wait ends at most once each time it begins, by one signal at most; no stage after
    a wait runs before the wait ended (by its event, its timeout, or its condition); a signal
    consumed is consumed once."""
    consumed = Counter(
        detail.get("signal")
        for kind, _, detail in events
        if kind in (EventKind.WAIT_COMPLETED, EventKind.WAIT_FAILED) and detail.get("signal")
    )
    assert all(n == 1 for n in consumed.values()), f"{where}: a signal applied twice {consumed}"
    for wait in waits:
        state = "pending"  # pending, waiting, ended (went on), over (failed or timed out)
        for kind, i, detail in events:
            if i == wait and kind == EventKind.WAIT_STARTED:
                assert state in ("pending", "over"), f"{where}: wait {wait} began while {state}"
                state = "waiting"
            elif i == wait and kind in WAIT_ENDS:
                if kind in (EventKind.WAIT_SKIPPED, EventKind.OPERATOR_SKIP):
                    assert state in ("pending", "waiting", "over"), f"{where}: {kind} {state}"
                else:
                    assert state == "waiting", f"{where}: wait {wait} ended ({kind}) {state}"
                went_on = kind in (EventKind.WAIT_COMPLETED, EventKind.WAIT_SKIPPED) or (
                    kind == EventKind.OPERATOR_SKIP
                    or (kind == EventKind.WAIT_TIMED_OUT and detail.get("action") == "continue")
                )
                state = "ended" if went_on else "over"
            elif kind == EventKind.STEP_COMPLETED and i is not None and i > wait:
                assert state == "ended", f"{where}: step {i} ran before wait {wait} ended"


def check_effects(
    saga_id: str,
    saga: dict,
    steps: list[dict],
    events: list,
    *,
    order: tuple[str, Decimal] | None,
    charged: list[Decimal],
    paid: int,
    reserved: int,
    shipped: int,
) -> None:
    """The domain rows agree with the step rows: a step's database effects are in place
    exactly while it has completed and is not undone; the gateway's charge (an external
    effect, made at least once) is kept only while its step may still complete or be undone."""
    status = saga["status"]
    by_index = {s["index"]: s["status"] for s in steps}
    where = f"saga {saga_id} ({status}, steps {list(by_index.values())})"
    completed = {i for kind, i, _ in events if kind == EventKind.STEP_COMPLETED}
    in_place = {i: i in completed and by_index[i] in EFFECT_IN_PLACE for i in by_index}

    assert (order is not None) == (0 in completed), f"{where}: order {order}"
    if order is not None:
        expected = (
            "cancelled"
            if by_index[0] == T.COMPENSATED
            else "confirmed"
            if status == S.COMPLETED
            else "pending"
        )
        assert order[0] == expected, f"{where}: order is {order[0]}"
    assert paid == in_place[CHARGE], f"{where}: payments {paid}"
    assert reserved == in_place[INDEX["reserve_inventory"]], f"{where}: reservations {reserved}"
    assert shipped == in_place[INDEX["schedule_shipment"]], f"{where}: shipments {shipped}"

    assert len(charged) <= 1, f"{where}: charged {charged}"
    if in_place[CHARGE]:
        assert order is not None and charged == [order[1]], f"{where}: charged {charged}"
    if by_index[CHARGE] == T.COMPENSATED or status == S.COMPENSATED:
        assert not charged, f"{where}: compensated, yet charged {charged}"
    if order is not None and order[0] == "cancelled":
        assert not charged, f"{where}: cancelled, yet charged {charged}"


# The suite runs the same examples every time (derandomize), so that the coverage asserted
# below holds in every run; SAGAS_STATEFUL_EXPLORE=<examples> draws new ones, as many.
# (SAGAS_STATEFUL_SHRINK=0 reports the first failing example as found, unshrunk.)
EXPLORE = int(os.environ.get("SAGAS_STATEFUL_EXPLORE", "0"))
SHRINK = os.environ.get("SAGAS_STATEFUL_SHRINK", "1") != "0"
STATEFUL_SETTINGS = settings(
    max_examples=EXPLORE or 100,
    stateful_step_count=40,
    deadline=None,
    derandomize=not EXPLORE,
    phases=[Phase.explicit, Phase.reuse, Phase.generate, *([Phase.shrink] if SHRINK else [])],
    database=None,  # no .hypothesis folder in the shared tree; reproduce with the seed
    suppress_health_check=[HealthCheck.too_slow],
)


def run_script(steps: list[Callable[[EngineMachine], object]]) -> None:
    """A fixed sequence of the machine's rules, with its invariants after each and its end."""
    machine = EngineMachine()
    for step in steps:
        step(machine)
        check_invariants()
    machine.teardown()


def deliver_all(machine: EngineMachine) -> None:
    while machine.broker.chains or machine.broker.callbacks:
        if machine.broker.chains:
            machine.deliver([0])
        else:
            machine.error_callback(0, "delivered")
        check_invariants()


def no_step_stopped_at_a_time_limit() -> None:
    stopped = SagaStep.objects.filter(error_code="time_limit").values_list("name", flat=True)
    assert not stopped, (
        f"a step whose task only failed to send the next was taken as stopped: {list(stopped)}"
    )
    assert STATS["next message refused"] >= 2, "the script refused no next message"


# Interleavings the random examples may or may not reach in a given run, made sure of.
SCRIPTS = {
    "a worker dies before its commit, a query times out, a COMMIT's answer is lost": [
        lambda m: m.start_saga("tok_ok", "GB", 1),
        lambda m: m.deliver([0]),
        lambda m: m.worker_fault(0, "killed"),  # the message comes back: the attempt counts
        lambda m: m.deliver([0]),
        lambda m: m.worker_fault(0, "own statement times out"),
        lambda m: m.worker_fault(0, "commit answer lost"),
        deliver_all,
    ],
    "a compensation fails for good; the operator resolves it": [
        lambda m: m.begin(["tok_ok"], "and its compensation fails", 2),
        deliver_all,
        lambda m: m.operator(0, "resolve", 0),
    ],
    "the worker dies after charging; the operator aborts before the message comes back": [
        lambda m: m.begin(["tok_ok"], "none", 1),
        lambda m: m.deliver([0]),
        lambda m: m.worker_fault(0, "killed, then aborted"),
    ],
    "the broker refuses the next message after a commit, forward and then backward": [
        lambda m: m.begin(["tok_ok"], "a business failure", 3),
        lambda m: m.worker_fault(0, "next message refused"),
        lambda m: m.error_callback(0, "delivered"),
        lambda m: m.deliver([0, 0, 0]),
        lambda m: m.error_callback(0, "delivered"),
        lambda m: m.worker_fault(0, "next message refused"),
        deliver_all,
        lambda m: no_step_stopped_at_a_time_limit(),
    ],
    "3-D Secure: confirmations early, twice, on time and late; webhooks; a timeout": [
        lambda m: m.start_saga("tok_3ds", "GB", 1),
        lambda m: m.start_saga("tok_3ds", "GB", 1),
        lambda m: m.start_saga("tok_3ds_abandoned", "GB", 1),
        lambda m: m.confirmation(0, "a"),  # before the saga reaches its wait: kept
        lambda m: m.confirmation(0, "a"),  # the same key: the first answer
        deliver_all,  # the first saga's wait consumes it as it begins; the others wait
        lambda m: m.webhook(0, "posted twice"),  # the first's: its wait is over (409)
        lambda m: m.webhook(0, "posted"),  # the second's, while it waits: 200
        lambda m: m.confirmation(1, "b"),  # after its wait: refused
        lambda m: m.confirmation_times_out(2),  # the abandoned one: compensated
        lambda m: m.confirmation(2, None),  # after the timeout: refused
        deliver_all,  # its stock released
        lambda m: m.start_saga("tok_3ds_abandoned", "GB", 1),
        deliver_all,
        lambda m: m.confirmation(3, None),  # it waits: consumed
        deliver_all,
    ],
    "the gateway stays down; the saga pauses; the operator retries once it is back": [
        lambda m: m.begin(["tok_timeout"], "none", 1),
        lambda m: m.gateway(True),
        deliver_all,
        lambda m: m.gateway(False),
        lambda m: m.operator(0, "retry", 0),
    ],
}


@pytest.fixture
def broker(monkeypatch) -> Broker:
    broker = Broker()
    monkeypatch.setattr("sagas.engine.dispatch.send_steps", broker.send_steps)
    monkeypatch.setattr("sagas.engine.dispatch.send_compensations", broker.send_compensations)
    for module in ("forward", "compensation"):
        monkeypatch.setattr(f"sagas.engine.{module}.resolve", resolve_checking_the_context)
    monkeypatch.setattr("payments.gateway.gateway_post_webhook.apply_async", broker.post_later)
    monkeypatch.setattr(EngineMachine, "broker", broker, raising=False)
    return broker


def test_engine_state_machine(transactional_db, broker, hearing):
    STATS.clear()
    for steps in SCRIPTS.values():
        run_script(steps)
    run_state_machine_as_test(EngineMachine, settings=STATEFUL_SETTINGS)
    print(dict(STATS))  # what the run exercised (`pytest -s` shows it)
    if EXPLORE:
        return
    # The run exercised what it claims to: not only happy paths, nor only rejected rules.
    for seen in [
        (STEP, "done"),
        (STEP, "duplicate"),
        (STEP, "retry"),
        (STEP, "fail"),
        (COMPENSATION, "done"),
        (COMPENSATION, "fail"),
        ("callback", STEP),
        "killed",
        "hard time limit",
        "next message refused",
        "own statement times out",
        "commit answer lost",
        "attempt counted as lost",
        "callback lost",
        ("operator", "retry"),
        ("operator", "compensate"),
        ("operator", "resolve"),
        ("confirmation", "kept"),
        ("confirmation", "consumed"),
        ("confirmation", "refused"),
        ("webhook", 200),
        ("webhook", 409),
        "wait timed out",
    ]:
        assert STATS[seen], f"no {seen} in {dict(STATS)}"
