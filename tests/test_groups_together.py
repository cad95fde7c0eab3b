"""A group that compensates its members concurrently (`Group(concurrent_compensation=True)`),
on real workers: the members' compensations run at the same time, each holding its member's
row as an action does, and the stages before the group are compensated once every member's
is done; a member's compensation that fails for good halts the saga (or, with
`continue_compensation_on_failure`, the rest goes on), a worker killed inside one is counted,
a repeated error callback changes nothing, and an operator acting meanwhile is told the saga
is busy rather than waiting. (A worker killed inside a member's compensation:
tests/test_groups_faults.py, for both ways of compensating.)

The sagas, members and their faults are those of tests/test_groups_faults.py
(tests/groupdefs.py: `faults_group_together`, `faults_group_together_continue`); each
compensation notes when it began and ended (`undone <member> <began> <ended>`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sagas import services
from sagas.engine import callbacks, dispatch
from sagas.exceptions import SagaBusy
from sagas.models import EventKind, Saga, SagaStep
from tests.conftest import wait_final, wait_for
from tests.test_groups_faults import (
    GROUP,
    STOCK,
    assert_undone_exactly_once,
    events,
    holding_member_row,
    members,
    products,
    rows_of,
    runs,
    stall,
    start,
    started,
    status,
    stocks,
    sweep,
)

pytestmark = pytest.mark.django_db(transaction=True)


def undone_spans(tmp_path: Path) -> dict[str, tuple[float, float]]:
    """When each member's compensation began and ended (its last run)."""
    lines = (tmp_path / "runs").read_text().splitlines()
    return {
        p[1]: (float(p[2]), float(p[3]))
        for p in (line.split() for line in lines)
        if p[0] == "undone"
    }


def overlapping(spans: dict[str, tuple[float, float]]) -> bool:
    """Whether two of the spans ran at the same time."""
    ordered = sorted(spans.values())
    return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(ordered))


def start_with_b_undo_stuck(name: str, tmp_path: Path, skus: dict[str, str]):
    """The saga fails at its last step; b's compensation fails while `<tmp>/undo_down`
    exists (it does): the saga ends as that failure leaves it."""
    stuck = tmp_path / "undo_down"
    stuck.touch()
    saga = start(name, tmp_path, skus, last="decline", undo_stuck=str(stuck), undo_fails=["b"])
    return wait_final(saga.pk, timeout=30)


def test_the_members_are_compensated_at_the_same_time_then_the_stages_before(saga_db, tmp_path):
    skus = products("a", "b", "c")
    saga = start("faults_group_together", tmp_path, skus, last="decline", undo_sleep=1.0)
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.error_code) == ("compensated", "declined_last")
    assert_undone_exactly_once(saga, skus)
    spans = undone_spans(tmp_path)
    assert set(spans) == {"a", "b", "c"}
    assert overlapping(spans), spans  # two workers' processes: at least two at once
    undone = [e.step_name for e in events(saga, EventKind.STEP_COMPENSATED)]
    assert undone[-1] == "first"  # after every member's
    assert sorted(undone[:-1]) == ["parallel.a", "parallel.b", "parallel.c"]
    assert SagaStep.objects.get(saga_id=saga.pk, name="parallel").status == "compensated"


def test_a_member_compensation_that_fails_for_good_halts_and_a_retry_resumes(saga_db, tmp_path):
    """b's compensation runs out of attempts: the others' still complete (they ran at the same
    time), the saga fails for an operator, and the stage before the group is not undone yet.
    Once the fault is gone, the operator's retry undoes b, then the stage before."""
    skus = products("a", "b", "c")
    saga = start_with_b_undo_stuck("faults_group_together", tmp_path, skus)

    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    wait_for(
        lambda: members(saga)["a"].status == members(saga)["c"].status == "compensated",
        what="the members' compensations in flight to end",
    )
    assert members(saga)["b"].status == "compensation_failed"
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "completed"
    assert stocks(skus) == {"a": STOCK, "b": STOCK - 1, "c": STOCK}

    (tmp_path / "undo_down").unlink()
    plan = services.saga_plan(saga_id=saga.pk, action="retry")
    assert plan.undo == ("parallel.b", "first")
    services.saga_retry(saga_id=saga.pk, actor="ops")
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.error_code) == ("compensated", "declined_last")
    assert_undone_exactly_once(saga, skus)


def test_carrying_on_after_a_member_compensation_fails_undoes_the_rest(saga_db, tmp_path):
    """With `continue_compensation_on_failure`, b's failure does not stop the others, and the
    last member's end sends the stages before the group: the saga ends failed with everything
    else undone."""
    skus = products("a", "b", "c")
    saga = start_with_b_undo_stuck("faults_group_together_continue", tmp_path, skus)

    assert (saga.status, saga.error_code) == ("failed", "compensation_failed")
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "compensated"
    done = members(saga)
    assert [done[n].status for n in "abc"] == ["compensated", "compensation_failed", "compensated"]
    assert stocks(skus) == {"a": STOCK, "b": STOCK - 1, "c": STOCK}


def test_a_member_compensations_error_callback_repeated_changes_nothing(saga_db, tmp_path):
    """Once every member is undone (and the stage before), the error callback of a member's
    compensation task, sent again late, finds nothing owed: no row changes."""
    skus = products("a", "b", "c")
    saga = wait_final(start("faults_group_together", tmp_path, skus, last="decline").pk)
    assert saga.status == "compensated"
    before = rows_of(saga)
    epoch = saga.epoch
    for _ in range(2):
        callbacks.compensation_chain_failed(
            str(saga.pk),
            epoch,
            cause="sagas.tasks.StepFailed",
            task_id=dispatch.task_id(str(saga.pk), epoch, GROUP, 1),
        )
    assert rows_of(saga) == before


def test_an_operator_resolving_a_member_whose_row_a_message_holds_is_told_busy(saga_db, tmp_path):
    """b's compensation failed for good; as an operator resolves it, a late message of b (its
    compensation's error callback, which locks b's row, then the saga's) holds b's row: the
    resolve does not wait for it (which could deadlock with that message), says the saga is
    busy and changes nothing; once the row is let go, it resolves b and the rest is undone."""
    skus = products("a", "b", "c")
    saga = start_with_b_undo_stuck("faults_group_together", tmp_path, skus)
    assert status(saga) == "failed"
    wait_for(lambda: members(saga)["a"].status == "compensated", what="a's compensation")
    wait_for(lambda: members(saga)["c"].status == "compensated", what="c's compensation")

    with holding_member_row(saga, 1):  # as b's late error callback does, before the saga's
        before = rows_of(saga)
        with pytest.raises(SagaBusy, match=r"parallel\.b"):
            services.saga_step_resolve(saga_id=saga.pk, index=GROUP, member=1, actor="ops")
        assert rows_of(saga) == before
    services.saga_step_resolve(saga_id=saga.pk, index=GROUP, member=1, actor="ops")
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert SagaStep.objects.get(saga_id=saga.pk, name="first").status == "compensated"


@pytest.mark.parametrize("name", ["faults_group", "faults_group_together"])
def test_the_sweeper_passes_over_a_saga_whose_member_compensation_runs(saga_db, tmp_path, name):
    """A member's compensation holds its member's row, not the saga's: while a long one runs,
    the saga's row shows no progress, yet it is not stalled. The sweeper passes over it, as it
    passes over a saga whose step holds the saga's lock: no re-send, no recovery counted, and
    never `recovery_exhausted`, however often it sweeps."""
    skus = products("a", "b", "c")
    saga = start(name, tmp_path, skus, last="decline", undo_sleep=3.0)
    wait_for(lambda: runs(tmp_path, "undo"), what="a member's compensation to begin")
    for _ in range(4):
        stall(saga)
        report = sweep()
        assert str(saga.pk) not in report.recovered + report.dead_lettered
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.recovery_attempts) == ("compensated", 0)
    assert_undone_exactly_once(saga, skus)
    assert not events(saga, EventKind.RECOVERED)


def test_the_sweeper_passes_over_a_saga_whose_member_attempt_runs(saga_db, tmp_path):
    """The same going forward: a member waiting at its gate holds its row while the saga's
    shows no progress; the sweeper passes over the saga until the member ends."""
    skus = products("a", "b", "c")
    saga = start("faults_group", tmp_path, skus, faults={"a": ["gate"]})
    started(tmp_path, "a")
    for _ in range(3):
        stall(saga)
        assert str(saga.pk) not in sweep().recovered
    (tmp_path / "gate.a").touch()
    saga = wait_final(saga.pk, timeout=30)

    assert (saga.status, saga.recovery_attempts) == ("completed", 0)
    assert runs(tmp_path) == {"a": 1, "b": 1, "c": 1}


def test_a_resend_while_members_undo_sends_none_of_those_running(saga_db, tmp_path, monkeypatch):
    """An error callback that sends the compensations again (the broker refused a message)
    while the members' compensations run: each running one holds its row and will record its
    outcome, so none is sent again (a message for one would only wait for its row, holding a
    worker process); the saga ends compensated, each member undone once."""
    skus = products("a", "b", "c")
    saga = start("faults_group_together", tmp_path, skus, last="decline", undo_sleep=3.0)
    wait_for(lambda: runs(tmp_path, "undo") == {"a": 1, "b": 1, "c": 1}, what="the undos to run")
    sent: list[list[int | None]] = []
    monkeypatch.setattr(
        dispatch,
        "send_member_compensations",
        lambda saga_id, epoch, entries, countdown: sent.append([e[2] for e in entries]),
    )
    epoch = Saga.objects.get(pk=saga.pk).epoch
    callbacks.compensation_chain_failed(
        str(saga.pk),
        epoch,
        cause="kombu.exceptions.OperationalError",
        task_id=dispatch.task_id(str(saga.pk), epoch, GROUP),
    )
    assert sent == []
    monkeypatch.undo()
    saga = wait_final(saga.pk, timeout=30)

    assert saga.status == "compensated"
    assert_undone_exactly_once(saga, skus)
