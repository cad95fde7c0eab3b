"""Parallel groups under faults, on real workers: a worker process killed while a member's
action runs, a member's error callback lost or repeated, a member killed at its hard time
limit, a member completing at the moment another fails for good, operators acting while
members are in flight, and a member's compensation that fails.

Every member takes one unit of stock (a database-local effect, committed with its row or not
at all) and notes each attempt in a file (an effect outside the transaction, which stays when
its attempt dies); its compensation notes itself and gives the unit back
(tests/groupdefs.py, `act` and `give_back`). The stock says that each member's effect happened
once and was undone once; the file says how often each action really ran.

Faults are placed as tests/test_failure_paths.py places them: in the member's own code (it
kills its process, hangs, waits at a gate), or by running an attempt here without its error
callback while the engine's messages are lost (`lose_messages`). The sweeper runs here, as beat
would run it, and only where a test says so.

A member's row names the epoch of its last send (`SagaMember.epoch`): its task's id is
`<saga>:<member's epoch>:<stage>.<position>`, and its error callback carries that epoch, not the
saga's. A test that calls a member's error callback reads the epoch from the member's row.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from django.db import connection, transaction
from django.utils import timezone

from inventory.models import Product
from sagaproject.celery import app as celery_app
from sagas import engine, services
from sagas.definitions import STAGE_TIME_LIMIT
from sagas.engine import callbacks, dispatch, groups, sweeper
from sagas.engine.compensation import SETTLE_POLL
from sagas.engine.unit import compensation_time_limit
from sagas.exceptions import InvalidTransition, SagaBusy
from sagas.models import EventKind, Saga, SagaEvent, SagaMember, SagaStep
from sagas.testing.models import Fault, FaultEffect, FaultPoint
from tests.conftest import attempt_in_process, lose_messages, wait_final, wait_for
from tests.factories import ProductFactory

pytestmark = pytest.mark.django_db(transaction=True)

STOCK = 10
GROUP = 1  # the group's stage in every saga of tests/groupdefs.py used here
TIME_LIMIT_EXCEEDED = "celery.exceptions.TimeLimitExceeded"


# -- reading the rows ------------------------------------------------------------------------


def products(*names: str) -> dict[str, str]:
    return {name: ProductFactory(stock_on_hand=STOCK).sku for name in names}


def stocks(skus: dict[str, str]) -> dict[str, int]:
    return {name: Product.objects.get(sku=sku).stock_on_hand for name, sku in skus.items()}


def start(name: str, tmp_path: Path, skus: dict[str, str], **input) -> Saga:
    runs, gate = tmp_path / "runs", tmp_path / "gate"
    saga, _ = services.saga_start(
        name=name, input={"skus": skus, "runs": str(runs), "gate": str(gate), **input}
    )
    return saga


def members(saga) -> dict[str, SagaMember]:
    return {m.name: m for m in SagaMember.objects.filter(saga_id=saga.pk).order_by("position")}


def status(saga) -> str:
    return Saga.objects.values_list("status", flat=True).get(pk=saga.pk)


def runs(tmp_path: Path, kind: str = "run") -> Counter:
    """How many times each member's action (`run`) or compensation (`undo`) ran."""
    path = tmp_path / "runs"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[1] for line in lines if line.split()[0] == kind)


def run_times(tmp_path: Path, member: str) -> list[float]:
    path = tmp_path / "runs"
    lines = path.read_text().splitlines() if path.exists() else []
    return [float(p[3]) for p in (line.split() for line in lines) if p[:2] == ["run", member]]


def events(saga, kind: str, name: str | None = None) -> list[SagaEvent]:
    found = SagaEvent.objects.filter(saga_id=saga.pk, kind=kind).order_by("id")
    return [e for e in found if name is None or e.step_name == name]


def compensated_members(saga) -> Counter:
    """How many times each member was recorded as compensated."""
    return Counter(
        e.detail["member"] for e in events(saga, EventKind.STEP_COMPENSATED) if "member" in e.detail
    )


def turns_back(saga) -> list[SagaEvent]:
    kinds = (EventKind.COMPENSATION_STARTED, EventKind.OPERATOR_COMPENSATE)
    return list(SagaEvent.objects.filter(saga_id=saga.pk, kind__in=kinds).order_by("id"))


def completed_members(saga) -> set[str]:
    return {
        e.detail["member"] for e in events(saga, EventKind.STEP_COMPLETED) if "member" in e.detail
    }


def assert_undone_exactly_once(saga, skus: dict[str, str]) -> None:
    """Every member that completed was compensated exactly once, and all stock is back."""
    completed = completed_members(saga)
    assert compensated_members(saga) == Counter(completed), (completed, compensated_members(saga))
    assert stocks(skus) == dict.fromkeys(skus, STOCK)


def member_in_process(saga, position: int) -> str:
    """One attempt of the group's member at `position`, run here as a worker would, without
    its error callback (as if the worker died right after): the outcome's kind."""
    saga_id = str(saga.pk)
    epoch = SagaMember.objects.values_list("epoch", flat=True).get(
        saga_id=saga_id, stage=GROUP, position=position
    )
    try:
        return engine.step_attempt(saga_id, GROUP, epoch=epoch, member=position).kind
    except Exception as exc:
        return engine.step_attempt_failed(saga_id, GROUP, exc, epoch=epoch, member=position).kind


def stall(saga) -> None:
    Saga.objects.filter(pk=saga.pk).update(updated_at=timezone.now() - timedelta(hours=1))


def sweep() -> sweeper.SweepReport:
    return sweeper.sweep(stale_after=timedelta(minutes=1))


def member_callback(saga, position: int, cause: str) -> None:
    """The error callback of the member's task as last sent (the epoch of its row), failed
    by `cause`, as `sagas.tasks.on_step_failure` calls it."""
    epoch = members_by_position(saga)[position].epoch
    task_id = dispatch.task_id(str(saga.pk), epoch, GROUP, position)
    callbacks.step_chain_failed(str(saga.pk), epoch, cause=cause, task_id=task_id)


def members_by_position(saga) -> dict[int, SagaMember]:
    return {m.position: m for m in SagaMember.objects.filter(saga_id=saga.pk)}


def rows_of(saga) -> tuple:
    """Everything a repeated error callback could change."""
    row = Saga.objects.get(pk=saga.pk)
    return (
        (row.status, row.epoch, row.direction, row.updated_at, row.error_code),
        sorted(SagaStep.objects.filter(saga_id=saga.pk).values_list("index", "status")),
        sorted(
            SagaMember.objects.filter(saga_id=saga.pk).values_list(
                "position", "status", "attempts", "compensation_attempts", "epoch"
            )
        ),
        SagaEvent.objects.filter(saga_id=saga.pk).count(),
    )


def worker_logs(workers) -> str:
    return "".join(log.read_text() for log in workers.logs)


def nodes_answering(workers) -> set[str]:
    replies = celery_app.control.ping(destination=workers.node_names, timeout=2.0)
    return {name for reply in replies for name in reply}


def open_gates(tmp_path: Path, *names: str) -> None:
    """Open the members' gates at the same moment."""
    opened = [threading.Thread(target=(tmp_path / f"gate.{n}").touch) for n in names]
    for thread in opened:
        thread.start()
    for thread in opened:
        thread.join()


@contextmanager
def holding_member_row(saga, position: int) -> Iterator[None]:
    """Hold the row of the group's member at `position` in another session meanwhile, as a
    late message of that member (an attempt, an error callback) does."""
    locked, release = threading.Event(), threading.Event()

    def late_message() -> None:
        try:
            with transaction.atomic():
                assert groups.lock_member(str(saga.pk), GROUP, position) is not None
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=late_message)
    holder.start()
    try:
        assert locked.wait(10)
        yield
    finally:
        release.set()
        holder.join(30)


def started(tmp_path: Path, *names: str) -> None:
    for name in names:
        wait_for(
            lambda name=name: (tmp_path / f"gate.{name}.started").exists(),
            what=f"member {name} to start",
        )


def no_transaction_open() -> bool:
    """Whether no other session of this database is inside a transaction (a member's attempt
    waiting at its gate holds its row, and its transaction, open)."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND xact_start IS NOT NULL"
        )
        return not cursor.fetchone()[0]


@pytest.fixture(autouse=True)
def gates_open_at_the_end(saga_db, tmp_path):
    """A test that ends before it opens its gates (a failed assertion, an expected failure)
    leaves no member's attempt waiting at one, holding its transaction open while the database
    is flushed: the gates open, the attempts end, then `saga_db` waits for the workers to go
    quiet."""
    yield
    for name in "abc":
        (tmp_path / f"gate.{name}").touch()
    wait_for(no_transaction_open, timeout=30, what="the workers' transactions to end")


# -- 1. a worker process killed while a member's action runs ----------------------------------


def test_a_member_killed_after_its_effect_runs_again_counted_and_takes_stock_once(
    saga_db, tmp_path
):
    """Member b's process dies after its action's effects and before its commit: its message
    comes back redelivered, the lost attempt is counted, and the next one completes. The stock
    it took in the attempt that died was rolled back with it."""
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"b": ["die_once"]})

    saga = wait_final(saga.pk, timeout=60)

    assert saga.status == "completed"
    done = members(saga)
    assert (done["b"].status, done["b"].attempts) == ("completed", 2)
    assert runs(tmp_path) == {"a": 1, "b": 2, "c": 1}  # every attempt that ran is counted
    assert done["a"].attempts == done["c"].attempts == 1
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)
    (lost,) = events(saga, EventKind.STEP_RETRYING, "parallel.b")
    assert (lost.detail["code"], lost.detail["delivery"]) == ("worker_lost", "redelivered")
    assert len(events(saga, EventKind.STEP_COMPLETED, "parallel")) == 1


def test_a_member_killed_at_every_attempt_fails_for_good_and_the_others_are_undone(
    saga_db, tmp_path
):
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"b": ["die"]})

    saga = wait_final(saga.pk, timeout=60)

    assert (saga.status, saga.error_code) == ("compensated", "worker_lost")
    done = members(saga)
    assert (done["b"].status, done["b"].attempts) == ("failed", 2)  # its policy's max_attempts
    assert runs(tmp_path)["b"] == 2
    assert done["a"].status == done["c"].status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "compensated"
    assert len(events(saga, EventKind.STEP_FAILED, "parallel.b")) == 1


# -- 2. a member's error callback lost, or repeated --------------------------------------------


def test_a_member_error_callback_lost_is_made_up_by_the_sweeper(saga_db, tmp_path, monkeypatch):
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start("faults_group", tmp_path, skus, faults={"b": ["decline"]})
    assert attempt_in_process(saga.pk, 0) == "done"  # begins the group; its messages are lost
    assert member_in_process(saga, 0) == "done"
    # Declined for good: the compensations its failure sends are lost, and so is its callback.
    assert member_in_process(saga, 1) == "fail"
    assert status(saga) == "compensating"
    monkeypatch.undo()

    stall(saga)
    assert sweep().recovered == [str(saga.pk)]
    saga = wait_final(saga.pk)

    assert (saga.status, saga.error_code) == ("compensated", "declined")
    done = members(saga)
    assert [done[n].status for n in "abc"] == ["compensated", "failed", "pending"]
    assert done["c"].attempts == 0 and runs(tmp_path)["c"] == 0  # never started
    assert_undone_exactly_once(saga, skus)


def test_a_worker_dying_between_a_members_final_failure_and_its_callback(saga_db, tmp_path):
    """The member's final failure commits (and sends the compensations), then its process dies
    before its task ends: the redelivered message finds the member failed for good, counts
    nothing, runs nothing, and ends with its error; its error callback has nothing to do. No
    sweeper."""
    skus = products("a", "b", "c")
    with transaction.atomic():
        saga = start("faults_group", tmp_path, skus, faults={"b": ["decline"]})
        Fault.objects.create(
            saga=saga,
            step_name="parallel",  # every member's attempt takes it; it fires at a final failure
            point=FaultPoint.AFTER_FINAL_FAILURE,
            effect=FaultEffect.CRASH,
        )

    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert members(saga)["b"].attempts == 1
    assert runs(tmp_path)["b"] == 1
    assert len(events(saga, EventKind.STEP_FAILED, "parallel.b")) == 1
    assert_undone_exactly_once(saga, skus)


def test_a_member_error_callback_repeated_changes_nothing(saga_db, tmp_path, monkeypatch):
    """b declines for good: its failure sends the compensations itself (lost here, under a new
    epoch of the saga's). The error callback of its task, b's own (its row's epoch), comes
    after, once or twice: it has nothing to do."""
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start("faults_group", tmp_path, skus, faults={"b": ["decline"]})
    attempt_in_process(saga.pk, 0)
    assert member_in_process(saga, 0) == "done"
    assert member_in_process(saga, 1) == "fail"
    b = members(saga)["b"]
    assert status(saga) == "compensating"
    assert Saga.objects.get(pk=saga.pk).epoch == b.epoch + 1  # the compensations' chain
    before = rows_of(saga)

    member_callback(saga, 1, "sagas.tasks.StepFailed")
    assert rows_of(saga) == before
    member_callback(saga, 1, "sagas.tasks.StepFailed")
    assert rows_of(saga) == before

    monkeypatch.undo()
    stall(saga)
    sweep()
    saga = wait_final(saga.pk)
    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)


def test_a_member_hard_limit_callback_repeated_counts_one_attempt(saga_db, tmp_path, monkeypatch):
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start("faults_group", tmp_path, skus)
    attempt_in_process(saga.pk, 0)  # the members are sent (lost): as if each began and hung
    sent = members(saga)["a"]
    task_id = dispatch.task_id(str(saga.pk), sent.epoch, GROUP, 0)
    killed = {"cause": TIME_LIMIT_EXCEEDED, "task_id": task_id}

    callbacks.step_chain_failed(str(saga.pk), sent.epoch, **killed)
    a = members(saga)["a"]
    assert (a.status, a.attempts, a.error_code) == ("running", 1, "time_limit")
    assert a.epoch == Saga.objects.get(pk=saga.pk).epoch > sent.epoch  # sent again (lost)
    after_first = rows_of(saga)
    callbacks.step_chain_failed(str(saga.pk), sent.epoch, **killed)  # now an older send's
    assert rows_of(saga) == after_first

    monkeypatch.undo()
    stall(saga)
    sweep()
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    assert members(saga)["a"].attempts == 2
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)


def test_two_members_callbacks_of_one_chain_each_count_their_attempt(
    saga_db, tmp_path, monkeypatch
):
    """Members a and b were sent in the same epoch and both killed at their hard time limit;
    their callbacks arrive one after the other. They are not repeats of each other: each
    counts its member's attempt and sends it again, under an epoch of its own."""
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start("faults_group", tmp_path, skus)
    attempt_in_process(saga.pk, 0)
    sent = members(saga)
    assert sent["a"].epoch == sent["b"].epoch == sent["c"].epoch

    member_callback(saga, 0, TIME_LIMIT_EXCEEDED)
    member_callback(saga, 1, TIME_LIMIT_EXCEEDED)

    done = members(saga)
    assert [(done[n].status, done[n].attempts) for n in "abc"] == [
        ("running", 1),
        ("running", 1),
        ("running", 0),
    ]
    assert sent["c"].epoch < done["a"].epoch < done["b"].epoch == Saga.objects.get(pk=saga.pk).epoch
    assert done["c"].epoch == sent["c"].epoch

    monkeypatch.undo()
    stall(saga)
    assert sweep().recovered == [str(saga.pk)]
    saga = wait_final(saga.pk)
    assert saga.status == "completed"
    done = members(saga)
    assert [done[n].attempts for n in "abc"] == [2, 2, 1]
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)


# -- 3. a member's hard time limit -------------------------------------------------------------


def test_a_member_ignoring_its_soft_limit_is_killed_each_attempt_counted(saga_db, tmp_path):
    skus = products("a", "b", "c")
    saga = start("faults_group_hung", tmp_path, skus, faults={"a": ["hang"]})

    saga = wait_final(saga.pk, timeout=60)

    assert (saga.status, saga.error_code) == ("compensated", "time_limit")
    done = members(saga)
    assert (done["a"].status, done["a"].attempts, done["a"].error_code) == (
        "failed",
        2,
        "time_limit",
    )
    assert runs(tmp_path)["a"] == 2
    assert done["b"].status == done["c"].status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert nodes_answering(saga_db) == set(saga_db.node_names)


# Both members killed at their hard limit at the same moment race for the saga's lock, and the
# one whose callback comes second finds the saga turned back: the tests place that second one
# apart (below, on workers), or in this process (after). It is counted all the same.


def test_two_members_killed_at_their_hard_limit_each_count_every_attempt(saga_db, tmp_path):
    """a hangs and is killed at its hard limit twice (its budget), which fails the group and
    turns the saga back while b's first attempt still hangs; b is killed at its own, longer
    limit a few seconds later. Every attempt that ran is counted: a's two, and b's one."""
    skus = products("a", "b", "c")
    saga = start("faults_group_hung_apart", tmp_path, skus, faults={"a": ["hang"], "b": ["hang"]})

    saga = wait_final(saga.pk, timeout=60)

    assert (saga.status, saga.error_code) == ("compensated", "time_limit")
    assert_undone_exactly_once(saga, skus)
    done = members(saga)
    assert runs(tmp_path) == {"a": 2, "b": 1, "c": 1}
    assert (done["a"].status, done["a"].attempts) == ("failed", 2)
    assert done["c"].status == "compensated"
    b = done["b"]
    assert (b.status, b.attempts, b.error_code) == ("failed", 1, "time_limit"), (
        b.status,
        b.attempts,
    )


def test_a_member_killed_at_its_hard_limit_after_the_saga_turned_back_is_counted(
    saga_db, tmp_path, monkeypatch
):
    """a's attempt is killed at its hard time limit (it recorded nothing); before its error
    callback comes, b fails for good and the saga turns back. a's callback (its own: the epoch
    of a's row) counts a's attempt, and a fails: nothing of it to undo."""
    skus = products("a", "b", "c")
    lose_messages(monkeypatch)
    saga = start("faults_group", tmp_path, skus, faults={"b": ["decline"]})
    attempt_in_process(saga.pk, 0)
    assert member_in_process(saga, 1) == "fail"
    assert status(saga) == "compensating"

    member_callback(saga, 0, TIME_LIMIT_EXCEEDED)
    a = members(saga)["a"]

    monkeypatch.undo()
    stall(saga)
    sweep()
    saga = wait_final(saga.pk)
    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert_undone_exactly_once(saga, skus)
    assert (a.status, a.attempts, a.error_code) == ("failed", 1, "time_limit"), (
        a.status,
        a.attempts,
    )


# -- 4. a member completes at the moment another fails for good --------------------------------


@pytest.mark.parametrize("round_", range(3))
def test_a_member_completing_as_another_fails_is_undone_exactly_once(saga_db, tmp_path, round_):
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"a": ["gate"], "b": ["gate", "decline"]})
    started(tmp_path, "a", "b")
    wait_for(lambda: members(saga)["c"].status == "completed", what="member c to complete")

    open_gates(tmp_path, "a", "b")
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.error_code) == ("compensated", "declined")
    done = members(saga)
    assert done["b"].status == "failed"
    assert done["a"].status == done["c"].status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert runs(tmp_path) == {"a": 1, "b": 1, "c": 1}


@pytest.mark.parametrize("round_", range(3))
def test_no_member_starts_after_the_compensation_began(saga_db, tmp_path, round_):
    """Two at a time: c is sent when a or b ends. a completes as b fails for good: c either
    started before the compensation began (and is undone), or never starts."""
    skus = products("a", "b", "c")
    saga = start(
        "faults_group_paced", tmp_path, skus, faults={"a": ["gate"], "b": ["gate", "decline"]}
    )
    started(tmp_path, "a", "b")

    open_gates(tmp_path, "a", "b")
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    (turned_back,) = [e for e in turns_back(saga) if e.step_name == ""]
    began = turned_back.created_at.timestamp()
    c = members(saga)["c"]
    if runs(tmp_path)["c"]:
        assert c.status == "compensated"
        # Within the moment between its check of the saga and the failure's commit.
        assert run_times(tmp_path, "c")[0] < began + 0.5
    else:
        assert (c.status, c.attempts) == ("pending", 0)


# -- 5. operators while members are in flight ---------------------------------------------------


def test_an_abort_between_two_attempts_of_a_member_stops_its_retry(saga_db, tmp_path):
    """b failed once and waits 4 s for its retry when the operator aborts: the retry arrives
    after the compensation began, and does not run."""
    skus = products("a", "b", "c")
    saga = start("faults_group_slow_retry", tmp_path, skus, faults={"b": ["flaky"]})
    wait_for(lambda: events(saga, EventKind.STEP_RETRYING, "parallel.b"), what="b's first attempt")
    wait_for(
        lambda: members(saga)["a"].status == members(saga)["c"].status == "completed",
        what="a and c",
    )

    plan = services.saga_compensate(saga_id=saga.pk, actor="ops")
    # b is running, between two attempts: undone if it completes, says the plan. Its retry
    # comes after the turn back, and does not run.
    assert plan.undo == ("parallel.c", "parallel.b (if it completes)", "parallel.a", "first")
    saga = wait_final(saga.pk, timeout=30)
    # Its retry: the same task as its first attempt, of the epoch of b's last send.
    task_id = dispatch.task_id(str(saga.pk), members(saga)["b"].epoch, GROUP, 1)
    wait_for(
        lambda: f"sagas.run_step[{task_id}] ignored" in worker_logs(saga_db),
        timeout=20,
        what="b's retry to arrive and stop",
    )

    assert saga.status == "compensated"
    b = members(saga)["b"]
    assert (b.status, b.attempts) == ("failed", 1)
    assert runs(tmp_path)["b"] == 1  # its retry did not run
    assert_undone_exactly_once(saga, skus)


def member_row_free(saga, position: int) -> bool:
    """Whether no transaction holds the row of the group's member at `position`."""
    with transaction.atomic():
        return (
            SagaMember.objects.select_for_update(no_key=True, skip_locked=True)
            .filter(saga_id=saga.pk, stage=GROUP, position=position)
            .exists()
        )


def paused_with_a_in_flight(tmp_path: Path, skus: dict[str, str]) -> Saga:
    """b pauses the saga (stuck: its policy's attempts run out) while a's attempt waits at its
    gate; c completed before. b waits at a gate of its own until c completed: a worker busy
    elsewhere could otherwise take c's message after the pause, when c no longer starts."""
    stuck = tmp_path / "down"
    stuck.touch()
    saga = start(
        "faults_group_pausing",
        tmp_path,
        skus,
        faults={"a": ["gate"], "b": ["gate"]},
        stuck=str(stuck),
    )
    started(tmp_path, "a", "b")
    wait_for(lambda: members(saga)["c"].status == "completed", what="c")
    open_gates(tmp_path, "b")
    wait_for(lambda: status(saga) == "failed", what="b to pause the saga")
    assert members(saga)["a"].status == "running"
    return saga


def test_a_retry_of_a_saga_paused_in_a_group_while_a_member_is_in_flight(saga_db, tmp_path):
    """b pauses the saga while a still runs; the operator retries before a ends: a runs once,
    b again with a new budget, and the group joins once."""
    skus = products("a", "b", "c")
    saga = paused_with_a_in_flight(tmp_path, skus)
    # b's last attempt's error callback locks b's row a moment (and finds b failed): the retry
    # comes after it (a retry at that moment: the test after this one).
    wait_for(
        lambda: f"saga {saga.pk}: error callback with nothing to do" in worker_logs(saga_db),
        what="b's error callback",
    )
    wait_for(lambda: member_row_free(saga, 1), what="b's row to be free")

    (tmp_path / "down").unlink()
    plan = services.saga_retry(saga_id=saga.pk, actor="ops")
    assert plan.run == ("parallel.a", "parallel.b", "last")
    wait_for(lambda: members(saga)["b"].status == "completed", what="b's retry")
    open_gates(tmp_path, "a")
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "completed"
    done = members(saga)
    assert [done[n].attempts for n in "abc"] == [1, 1, 1]
    assert runs(tmp_path) == {"a": 1, "b": 4, "c": 1}  # b: stuck three times, then once more
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)
    assert len(events(saga, EventKind.STEP_COMPLETED, "parallel")) == 1
    assert len(events(saga, EventKind.STEP_COMPLETED, "parallel.a")) == 1


def test_a_retry_while_a_late_delivery_holds_the_failed_members_row(saga_db, tmp_path, monkeypatch):
    """The saga paused at b (stuck, its attempts run out). As the operator retries, a late
    delivery for b (its last attempt's error callback, which locks b's row, then the saga's)
    holds b's row: the retry does not wait for it (which could deadlock with that callback):
    it says the saga is busy and changes nothing. Once the row is let go, the retry runs b
    and the saga completes, without the sweeper."""
    skus = products("a", "b", "c")
    stuck = tmp_path / "down"
    stuck.touch()
    lose_messages(monkeypatch)
    saga = start("faults_group_pausing", tmp_path, skus, stuck=str(stuck))
    attempt_in_process(saga.pk, 0)
    assert [member_in_process(saga, p) for p in (0, 2)] == ["done", "done"]
    assert [member_in_process(saga, 1) for _ in range(3)] == ["retry", "retry", "fail"]
    assert status(saga) == "failed"
    stuck.unlink()
    monkeypatch.undo()

    with holding_member_row(saga, 1):  # as b's late error callback does, before the saga's
        before = rows_of(saga)
        with pytest.raises(SagaBusy, match=r"parallel\.b"):
            services.saga_retry(saga_id=saga.pk, actor="ops")
        assert rows_of(saga) == before  # nothing changed
    plan = services.saga_retry(saga_id=saga.pk, actor="ops")
    assert plan.run == ("parallel.b", "last")
    saga = wait_final(saga.pk)

    assert saga.status == "completed"
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)


def test_a_saga_paused_in_a_group_then_compensated_waits_for_the_member_in_flight(
    saga_db, tmp_path
):
    skus = products("a", "b", "c")
    saga = paused_with_a_in_flight(tmp_path, skus)

    plan = services.saga_compensate(saga_id=saga.pk, actor="ops")
    # What it says of a, in flight: test_the_plan_of_a_paused_saga_lists_its_member_in_flight.
    assert (plan.undo[0], plan.undo[-1]) == ("parallel.c", "first")
    with pytest.raises(InvalidTransition):
        services.saga_retry(saga_id=saga.pk, actor="ops")  # compensating: no way back
    open_gates(tmp_path, "a")
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    done = members(saga)
    assert [done[n].status for n in "abc"] == ["compensated", "failed", "compensated"]
    assert_undone_exactly_once(saga, skus)
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "compensated"


def test_the_plan_of_a_paused_saga_lists_its_member_in_flight(saga_db, tmp_path):
    """The saga paused while a's attempt runs: compensating it would undo a if a completes
    (as the test above shows it does), and the plan says so."""
    skus = products("a", "b", "c")
    saga = paused_with_a_in_flight(tmp_path, skus)

    plan = services.saga_plan(saga_id=saga.pk, action="compensate")
    open_gates(tmp_path, "a")
    wait_for(lambda: members(saga)["a"].status == "completed", what="a to complete")

    assert plan.allowed, plan.reason
    assert plan.undo == ("parallel.c", "parallel.a (if it completes)", "first")


def test_an_abort_at_the_moment_a_member_fails_for_good(saga_db, tmp_path):
    """The operator's abort and b's final failure race for the saga's lock: whichever comes
    second finds the saga compensating; the completed members are undone once."""
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"a": ["gate"], "b": ["gate", "decline"]})
    started(tmp_path, "a", "b")
    wait_for(lambda: members(saga)["c"].status == "completed", what="c")

    refused: list[BaseException] = []

    def abort() -> None:
        try:
            services.saga_compensate(saga_id=saga.pk, actor="ops")
        except InvalidTransition as exc:
            refused.append(exc)
        finally:
            connection.close()

    aborting = threading.Thread(target=abort)
    aborting.start()
    open_gates(tmp_path, "b")
    aborting.join(30)
    open_gates(tmp_path, "a")
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    turned_back = [e for e in turns_back(saga) if e.step_name == ""]
    assert len(turned_back) == 1, turned_back  # by b's failure, or by the operator
    assert len(refused) == (turned_back[0].kind == EventKind.COMPENSATION_STARTED)
    assert runs(tmp_path) == {"a": 1, "b": 1, "c": 1}


# -- 6. a member's compensation that fails ------------------------------------------------------


def _compensation_of_c_fails(tmp_path: Path, skus: dict, name: str) -> Saga:
    stuck = tmp_path / "undo_down"
    stuck.touch()
    saga = start(name, tmp_path, skus, last="decline", undo_stuck=str(stuck), undo_fails=["c"])
    saga = wait_final(saga.pk, timeout=30)
    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    return saga


def test_a_member_compensation_exhausted_fails_the_saga_and_a_retry_resumes(saga_db, tmp_path):
    skus = products("a", "b", "c")
    saga = _compensation_of_c_fails(tmp_path, skus, "faults_group")

    done = members(saga)
    assert (done["c"].status, done["c"].compensation_attempts) == ("compensation_failed", 2)
    assert done["a"].status == done["b"].status == "compensating"  # not reached
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "completed"
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)  # nothing given back yet
    assert runs(tmp_path, "undo") == {"c": 2}

    (tmp_path / "undo_down").unlink()
    plan = services.saga_plan(saga_id=saga.pk, action="retry")
    assert plan.undo == ("parallel.c", "parallel.b", "parallel.a", "first")
    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.error_code) == ("compensated", "declined_last")
    assert_undone_exactly_once(saga, skus)
    assert members(saga)["c"].compensation_attempts == 1  # a new budget
    assert runs(tmp_path, "undo") == {"c": 3, "b": 1, "a": 1}
    assert SagaStep.objects.get(saga_id=saga.pk, name="parallel").status == "compensated"


def test_continue_compensation_on_failure_undoes_the_rest_then_fails(saga_db, tmp_path):
    skus = products("a", "b", "c")
    saga = _compensation_of_c_fails(tmp_path, skus, "faults_group_continue")

    done = members(saga)
    assert [done[n].status for n in "abc"] == ["compensated", "compensated", "compensation_failed"]
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "compensated"
    assert stocks(skus) == {"a": STOCK, "b": STOCK, "c": STOCK - 1}

    (tmp_path / "undo_down").unlink()
    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert runs(tmp_path, "undo") == {"c": 3, "b": 1, "a": 1}


def test_an_operator_resolves_a_member_whose_compensation_failed(saga_db, tmp_path, admin_client):
    """c's compensation failed (the stock service is still down): the operator gives c's unit
    back by hand and resolves c, the member, not its group's stage; the compensation goes on
    with b, a and the first step."""
    skus = products("a", "b", "c")
    saga = _compensation_of_c_fails(tmp_path, skus, "faults_group")

    def plan(**where) -> engine.Plan:
        return services.saga_plan(saga_id=saga.pk, action="resolve", index=GROUP, **where)

    refused = plan()  # the group's stage: still compensating, its members owed
    assert (refused.allowed, refused.reason) == (
        False,
        "Only a step whose compensation failed can be resolved.",
    )
    assert not plan(member=0).allowed  # a: compensating, not failed
    assert plan(member=3).reason == "No such member of a group."
    resolving = plan(member=2)
    assert resolving.allowed, resolving.reason
    assert resolving.reason == "Mark parallel.c as compensated by hand."
    assert resolving.undo == ("parallel.b", "parallel.a", "first")
    previewed = admin_client.get(
        f"/api/sagas/{saga.pk}/plan/?action=resolve&index={GROUP}&member=2"
    ).json()
    assert (previewed["allowed"], previewed["undo"]) == (True, list(resolving.undo))

    Product.objects.filter(sku=skus["c"]).update(stock_on_hand=STOCK)  # by hand
    response = admin_client.post(f"/api/sagas/{saga.pk}/steps/{GROUP}/resolve/?member=2")
    assert response.status_code == 202, response.content
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.error_code) == ("compensated", "declined_last")
    done = members(saga)
    assert [done[n].status for n in "abc"] == ["compensated"] * 3
    assert done["c"].compensation_attempts == 2  # its two failed attempts; none ran since
    assert runs(tmp_path, "undo") == {"c": 2, "b": 1, "a": 1}
    assert stocks(skus) == dict.fromkeys(skus, STOCK)
    assert compensated_members(saga) == {"a": 1, "b": 1}  # and c, by the operator:
    (resolved,) = events(saga, EventKind.OPERATOR_RESOLVE)
    assert (resolved.step_name, resolved.detail["member"]) == ("parallel.c", "c")
    assert resolved.detail["actor"] == "admin"
    assert SagaStep.objects.get(saga_id=saga.pk, name="parallel").status == "compensated"
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "compensated"


# -- the group's settling under faults ------------------------------------------------------------


def no_compensation_failed(saga) -> bool:
    """No compensation attempt of the saga was counted as failed."""
    kinds = (EventKind.COMPENSATION_RETRYING, EventKind.COMPENSATION_FAILED)
    return not SagaEvent.objects.filter(saga_id=saga.pk, kind__in=kinds).exists()


def _compensating_after_the_group(tmp_path, monkeypatch, skus) -> Saga:
    """A saga whose group completed and whose last stage declined, with its compensations
    not sent yet (lost): the group's settling is the next compensation due."""
    lose_messages(monkeypatch)
    saga = start("faults_group", tmp_path, skus, last="decline")
    attempt_in_process(saga.pk, 0)
    assert [member_in_process(saga, p) for p in range(3)] == ["done"] * 3
    assert attempt_in_process(saga.pk, 2) == "fail"
    assert status(saga) == "compensating"
    return saga


def test_a_redelivered_settling_message_does_not_stop_the_compensation(
    saga_db, tmp_path, monkeypatch
):
    """The message of the group's settling comes back redelivered (its worker died, or a warm
    shutdown gave back the message it held): what `sagas.tasks` does first with such a
    message, here. The settling runs no compensation of its own: nothing is counted. Then the
    workers go on."""
    skus = products("a", "b", "c")
    saga = _compensating_after_the_group(tmp_path, monkeypatch, skus)
    monkeypatch.undo()
    before = rows_of(saga)

    assert engine.attempt_lost(str(saga.pk), GROUP, forward=False, why="redelivered") is None
    assert rows_of(saga) == before
    with transaction.atomic():
        unit = engine.lock(str(saga.pk))
        unit.send_compensations()
        unit.save()
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert no_compensation_failed(saga)


def test_a_settling_that_waits_for_the_sagas_lock_past_its_time_limit(
    saga_db, tmp_path, monkeypatch
):
    """Another transaction holds the saga's lock (a slow operator request, a sweep of many
    sagas) past the settling's time limit. The engine gives a group's settling 30 s
    (`STAGE_TIME_LIMIT`); the test sends the settling's chain as the engine would, but with
    1 s, for the wait to outlast it quickly: the soft limit interrupts the wait (the hard one
    may kill it), and the settling is tried again, uncounted. Once the lock is free the
    members are undone, once each."""
    skus = products("a", "b", "c")
    saga = _compensating_after_the_group(tmp_path, monkeypatch, skus)
    with transaction.atomic():
        unit = engine.lock(str(saga.pk))
        unit.send_compensations()  # lost: sent below while the lock is held
        unit.save()
        epoch = unit.saga.epoch
        entries = [
            (s.index, compensation_time_limit(s), getattr(s, "position", None))
            for s in unit.to_compensate()
        ]
    monkeypatch.undo()
    assert entries[0] == (GROUP, STAGE_TIME_LIMIT, None)
    entries[0] = (GROUP, 1, None)
    settle = dispatch.task_id(str(saga.pk), epoch, GROUP)

    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                Saga.objects.select_for_update().get(pk=saga.pk)
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert locked.wait(10)
        dispatch.send_compensations(str(saga.pk), epoch, entries, 0.0)
        wait_for(
            lambda: (
                f"Soft time limit (1s) exceeded for sagas.compensate_step[{settle}]"
                in worker_logs(saga_db)
            ),
            timeout=20,
            what="the settling to reach its time limit while it waits",
        )
    finally:
        release.set()
        holder.join(30)

    saga = wait_final(saga.pk, timeout=20)
    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert no_compensation_failed(saga)


def test_the_settling_never_waits_for_a_members_row(saga_db, tmp_path, monkeypatch):
    """A late delivery for a member (a redelivered message, a repeated callback) locks the
    member's row first, then asks for the saga's (`groups.member_lost`,
    `member_attempt_failed`, `member_chain_failed`, for a member in progress). The settling,
    holding the saga's lock, must not wait for that member's row (the two would deadlock):
    it takes the members' rows with SKIP LOCKED, changes nothing, and looks again later."""
    skus = products("a", "b", "c")
    saga = _compensating_after_the_group(tmp_path, monkeypatch, skus)
    epoch = Saga.objects.get(pk=saga.pk).epoch
    before = rows_of(saga)

    locked, release, settled = threading.Event(), threading.Event(), threading.Event()
    outcome: list = []

    def late_member_delivery() -> None:
        try:
            with transaction.atomic():
                assert groups.lock_member(str(saga.pk), GROUP, 0) is not None
                locked.set()
                release.wait(30)
        finally:
            connection.close()

    def settle() -> None:
        try:
            with transaction.atomic():
                with connection.cursor() as cursor:
                    cursor.execute("SET LOCAL lock_timeout = '3s'")
                outcome.append(engine.compensation_attempt(str(saga.pk), GROUP, epoch=epoch))
        except Exception as exc:
            outcome.append(exc)
        finally:
            settled.set()
            connection.close()

    holder = threading.Thread(target=late_member_delivery)
    holder.start()
    try:
        assert locked.wait(10)
        settling = threading.Thread(target=settle)
        settling.start()
        settling.join(30)
    finally:
        release.set()
        holder.join(30)

    assert [(o.kind, o.countdown) for o in outcome] == [("retry", SETTLE_POLL)], outcome
    assert rows_of(saga) == before

    monkeypatch.undo()
    with transaction.atomic():  # what the settling's task does with its retry
        unit = engine.lock(str(saga.pk))
        unit.send_compensations()
        unit.save()
    saga = wait_final(saga.pk, timeout=20)
    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert no_compensation_failed(saga)


def test_a_late_delivery_for_a_completed_member_during_the_settling(saga_db, tmp_path, monkeypatch):
    """On real workers: a delivery for member a arrives late (a redelivered message, a repeated
    callback) as the group's settling begins. It locks a's row, then asks for the saga's (here,
    in this process, with the engine's own functions; the engine's member paths ask only for a
    member in progress, and a completed: the harder case). The settling, on a worker, finds
    a's row held: it changes nothing and looks again a moment later, leaving the saga's lock to
    the late delivery. The saga ends compensated, its members undone once, without the
    sweeper."""
    skus = products("a", "b", "c")
    saga = _compensating_after_the_group(tmp_path, monkeypatch, skus)
    monkeypatch.undo()
    locked, go = threading.Event(), threading.Event()
    late: list = []

    def late_delivery() -> None:
        try:
            with transaction.atomic():
                assert groups.lock_member(str(saga.pk), GROUP, 0) is not None
                locked.set()
                assert go.wait(30)
                unit = engine.lock(str(saga.pk))
                late.append(unit.member(GROUP, 0).status)
        except Exception as exc:
            late.append(exc)
        finally:
            connection.close()

    delivery = threading.Thread(target=late_delivery)
    delivery.start()
    try:
        assert locked.wait(10)
        with transaction.atomic():
            unit = engine.lock(str(saga.pk))
            unit.send_compensations()  # the group's settling first
            unit.save()
        settle = dispatch.task_id(str(saga.pk), unit.saga.epoch, GROUP)
        wait_for(
            lambda: f"sagas.compensate_step[{settle}] retry" in worker_logs(saga_db),
            timeout=10,
            what="the settling to find a's row held, and look again later",
        )
        assert [m.status for m in members(saga).values()] == ["completed"] * 3
    finally:
        go.set()
        delivery.join(30)

    assert late == ["completed"]
    saga = wait_final(saga.pk, timeout=8)
    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
    assert no_compensation_failed(saga)


def test_a_member_failing_after_a_sweep_compensates_at_once(saga_db, tmp_path):
    """The sweeper finds the saga stale while a and b run: their rows are held by their
    attempts, so it is not stalled, and the sweeper passes over it (no duplicate, no new
    epoch, no recovery counted). b then declines: its final failure sends the compensations
    itself, at once, not at the next sweep."""
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"a": ["gate"], "b": ["gate", "decline"]})
    started(tmp_path, "a", "b")
    wait_for(lambda: members(saga)["c"].status == "completed", what="member c to complete")
    sent = members(saga)
    stall(saga)
    report = sweep()
    assert str(saga.pk) not in report.recovered + report.dead_lettered
    swept = members(saga)
    assert [swept[n].epoch for n in "ab"] == [sent[n].epoch for n in "ab"]
    assert Saga.objects.get(pk=saga.pk).recovery_attempts == 0

    open_gates(tmp_path, "b")
    wait_for(lambda: status(saga) == "compensating", what="b's final failure")
    open_gates(tmp_path, "a")
    wait_for(lambda: members(saga)["a"].status != "running", what="a to finish")

    saga = wait_final(saga.pk, timeout=8)
    assert (saga.status, saga.error_code) == ("compensated", "declined")
    assert_undone_exactly_once(saga, skus)
    assert runs(tmp_path) == {"a": 1, "b": 1, "c": 1}


@pytest.mark.parametrize("name", ["faults_group", "faults_group_together"])
def test_a_member_compensation_killed_after_its_effect_is_counted_and_undoes_once(
    saga_db, tmp_path, name
):
    """b's compensation gives the unit back, then its process dies before the commit: the
    unit's return rolled back with it; the redelivered message counts the attempt, the next
    one gives the unit back once (the members' compensations one at a time, or at the same
    time: a and c are not disturbed)."""
    skus = products("a", "b", "c")
    saga = start(name, tmp_path, skus, last="decline", undo_dies=["b"])

    saga = wait_final(saga.pk, timeout=60)

    assert saga.status == "compensated"
    b = members(saga)["b"]
    assert (b.status, b.compensation_attempts) == ("compensated", 2)
    assert runs(tmp_path, "undo") == {"a": 1, "b": 2, "c": 1}
    assert_undone_exactly_once(saga, skus)
    (retried,) = events(saga, EventKind.COMPENSATION_RETRYING, "parallel.b")
    assert retried.detail["code"] == "worker_lost"


def test_a_member_never_sent_is_neither_compensated_nor_waited_for(saga_db, tmp_path):
    """One member at a time: a declines, so b (which may half-happen when it runs) is never
    sent. Nothing of b can have happened; the compensation does not wait a minute for it."""
    skus = products("a", "b", "c")
    saga = start("faults_group_one_at_a_time", tmp_path, skus, faults={"a": ["decline"]})

    saga = wait_final(saga.pk, timeout=8)

    assert saga.status == "compensated"
    done = members(saga)
    assert [(done[n].status, done[n].attempts) for n in "abc"] == [
        ("failed", 1),
        ("pending", 0),
        ("pending", 0),
    ]
    assert runs(tmp_path) == {"a": 1}
    assert runs(tmp_path, "undo") == {}
    assert_undone_exactly_once(saga, skus)
    assert not events(saga, EventKind.COMPENSATION_STARTED, "parallel")  # nothing owed


def end_sessions_idle_in_a_transaction() -> int:
    """End the sessions of this database that wait, inside a transaction, for their client (a
    member's attempt at its gate), as a PostgreSQL restart or a failover would."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
            "AND state = 'idle in transaction'"
        )
        return int(cursor.fetchone()[0])


def test_a_member_whose_session_ends_while_its_action_runs_is_counted(saga_db, tmp_path):
    """b's database session ends while its action waits (its stock taken, in the transaction
    that dies with the session): the attempt is counted as lost, the next one completes."""
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"b": ["gate"]})
    started(tmp_path, "b")
    wait_for(
        lambda: members(saga)["a"].status == members(saga)["c"].status == "completed",
        what="a and c",
    )
    assert end_sessions_idle_in_a_transaction() == 1
    open_gates(tmp_path, "b")

    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "completed"
    b = members(saga)["b"]
    assert (b.status, b.attempts) == ("completed", 2)
    assert runs(tmp_path)["b"] == 2
    (lost,) = events(saga, EventKind.STEP_RETRYING, "parallel.b")
    assert lost.detail["code"] == "connection_lost"
    assert stocks(skus) == dict.fromkeys(skus, STOCK - 1)
